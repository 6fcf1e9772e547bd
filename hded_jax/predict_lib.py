"""Depth and all-in-focus predictions for image files, any size, batched and jitted.

Per input image `<stem>` (in the output directory):
  <stem>_depth.npy  float32 (H, W): the depth head in the model's depth units (metres for models
                    trained here or imported with the right `depth_scale`);
  <stem>_depth.png  that depth colour-mapped (turbo, near = blue) over a range that is logged;
  <stem>_aif.npy    float32 (H, W, 3) in [0, 1]: the all-in-focus image;
  <stem>_aif.png    the same as 8-bit RGB.
A model without one of the heads writes no files for it. H, W are the input's size as shown
(EXIF orientation applied; files are read by `images.read_rgb`): images are scaled to [-1, 1] as
in training (x / 127.5 - 1), padded at the bottom and right to a multiple of 32 (`pad_mode`
'reflect' or 'edge') and the outputs cropped back. Images that pad to the same size are batched
together, at most `batch_size` at a time. With `resize=(h, w)` images are first resized
(bilinear) to that size, e.g. the training size, and the outputs resized (bilinear) back to the
input's size. Files named like this command's outputs of another input (`x_depth.png` beside
`x.jpg`) are not read as inputs, so predicting into the input folder twice is safe.
"""

import collections
import dataclasses
import glob
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from hded_jax import checkpoints, defocus, files, visualize
from hded_jax import images
from hded_jax import progress
from hded_jax import runtime
from hded_jax.models.hded_net import INPUT_MULTIPLE

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
OUTPUT_SUFFIXES = tuple(f'_{head}.{ext}' for head in ('depth', 'aif') for ext in ('npy', 'png'))
PAD_MODES = ('reflect', 'edge')
LOG_EVERY_S = 10.0

Forward = Callable[[np.ndarray], dict[str, jax.Array]]


@dataclasses.dataclass
class PredictionReport:
  written: list[str] = dataclasses.field(default_factory=list)  # Input paths done.
  skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # Input path -> reason.


def parse_resize(text: str) -> tuple[int, int] | None:
  """'HxW' -> (H, W); '' -> None."""
  if not text:
    return None
  try:
    h, w = (int(v) for v in text.lower().split('x'))
  except ValueError:
    h = w = 0
  if h <= 0 or w <= 0:
    raise ValueError(f'--resize={text!r}: expected HEIGHTxWIDTH in pixels, e.g. 256x256.')
  return h, w


def find_inputs(pattern: str) -> tuple[list[str], dict[str, str]]:
  """An image file, a folder (not recursive) or a glob -> (image paths, skipped: reason)."""
  if os.path.isfile(pattern):
    return [pattern], {}
  if os.path.isdir(pattern):
    files = [os.path.join(pattern, f) for f in os.listdir(pattern)]
  else:
    files = glob.glob(pattern)
  files = sorted(f for f in files if os.path.isfile(f))
  image_paths = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
  outputs = {os.path.splitext(f)[0] + suffix for f in image_paths for suffix in OUTPUT_SUFFIXES}
  if ours := [f for f in files if f in outputs]:
    logging.info('Not reading %d earlier outputs of predict.py as inputs (%s, ...).', len(ours),
                 os.path.basename(ours[0]))
    files = [f for f in files if f not in outputs]
    image_paths = [f for f in image_paths if f not in outputs]
  skipped = {f: 'not an image file extension' for f in files if f not in image_paths}
  if not image_paths:
    raise FileNotFoundError(
        f'No image files ({", ".join(IMAGE_EXTENSIONS)}) match --input={pattern!r}'
        f'{f" (only {len(files)} other files)" if files else ""}; pass an image, a folder of '
        'images or a quoted glob such as "photos/*.jpg".')
  stems = collections.Counter(_stem(f) for f in image_paths)
  if clashes := sorted(f for f in image_paths if stems[_stem(f)] > 1):
    raise ValueError(f'These inputs would write the same output files: {clashes}. Give them '
                     'distinct names or predict them into separate output directories.')
  return image_paths, skipped


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def padded_size(size: tuple[int, int], multiple: int = INPUT_MULTIPLE) -> tuple[int, int]:
  return tuple(-(-n // multiple) * multiple for n in size)


def pad_to_multiple(batch: np.ndarray, mode: str, multiple: int = INPUT_MULTIPLE) -> np.ndarray:
  """Pads NHWC at the bottom and right so that H and W are multiples of ``multiple``."""
  if mode not in PAD_MODES:
    raise ValueError(f'pad_mode={mode!r}: choose one of {PAD_MODES}.')
  h, w = batch.shape[1:3]
  pad = ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0))
  return np.pad(batch, pad, mode=mode)


def make_forward(model: nnx.Module, camera: Sequence[float] | None = None) -> Forward:
  """A jitted eval-mode forward pass (one compile per batch shape). ``camera`` (focal length,
  f-number, pixel size, focus distance: ``defocus.CAMERA_FIELDS``) is the photos' camera, which
  a camera-aware model (``model.camera_input``) needs and other models do not read."""
  if getattr(model, 'camera_input', False) and camera is None:
    raise ValueError('This model was trained with model.camera_input=True: pass the photos\' '
                     'camera, --camera=FOCAL_LENGTH,F_NUMBER,PIXEL_SIZE,FOCUS_DISTANCE (metres; '
                     'the pixel size at the resolution the camera records, e.g. '
                     '0.015,2.8,5.6e-6,2.0 for the NYU camera focused at 2 m).')
  if camera is not None and not getattr(model, 'camera_input', False):
    logging.warning('The camera is not used: this model was trained without '
                    'model.camera_input, and its predictions do not depend on it.')
  if camera is not None and len(camera) != len(defocus.CAMERA_FIELDS):
    raise ValueError(f'camera={list(camera)}: expected {len(defocus.CAMERA_FIELDS)} values, '
                     f'{", ".join(defocus.CAMERA_FIELDS)}.')
  model.eval()
  graphdef, state = nnx.split(model)
  camera = np.zeros(len(defocus.CAMERA_FIELDS)) if camera is None else camera
  camera = np.asarray(camera, np.float32)
  forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(
      batch, camera=np.broadcast_to(camera, (batch.shape[0], camera.size))))
  return lambda batch: forward(state, batch)


def predict_batch(forward: Forward, photos: Sequence[np.ndarray], *,
                  pad_mode: str) -> list[dict[str, np.ndarray]]:
  """uint8 images of one padded size -> per image, outputs cropped to it, AiF in [0, 1].

  One compile per batch shape: a bucket's full batches share one, its last partial batch takes
  another, which costs less memory and time than computing padding images.
  """
  batch = np.stack([
      pad_to_multiple(images.to_network_range(p)[None], pad_mode)[0] for p in photos])
  outputs = {k: np.asarray(v) for k, v in forward(batch).items()}
  if 'aif' in outputs:
    outputs['aif'] = images.to_clipped_unit_range(outputs['aif'])
  return [{k: v[i, :p.shape[0], :p.shape[1]] for k, v in outputs.items()}
          for i, p in enumerate(photos)]


def _out_of_memory(error: Exception, photos: Sequence[np.ndarray], batch_size: int) -> str:
  h, w = photos[0].shape[:2]
  return (f'Out of memory predicting {len(photos)} image(s) of {h}x{w} (padded to '
          f'{"x".join(map(str, padded_size((h, w))))}) at once on '
          f'{jax.devices()[0].device_kind}. Lower --batch_size (now {batch_size}; 1 needs the '
          'least) or pass --resize=HxW to run at a smaller size (e.g. the training size, '
          f'256x256; outputs are resized back). XLA: {str(error).splitlines()[0][:300]}')


def resize_output(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of float (H, W) or (H, W, C) to size = (h, w), channel by channel."""
  if array.shape[:2] == tuple(size):
    return array
  resize = lambda channel: images.resize(channel.astype(np.float32), size,
                                         Image.Resampling.BILINEAR)
  if array.ndim == 2:
    return resize(array)
  return np.stack([resize(array[..., c]) for c in range(array.shape[-1])], axis=-1)


def depth_limits(depth: np.ndarray, depth_range: tuple[float, float] | None
                 ) -> tuple[float, float]:
  if depth_range is not None:
    return depth_range
  finite = depth[np.isfinite(depth)]
  return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)


def write_outputs(output_dir: str, stem: str, outputs: dict[str, np.ndarray],
                  depth_range: tuple[float, float] | None) -> None:
  if 'depth' in outputs:
    depth = outputs['depth'].astype(np.float32)
    vmin, vmax = depth_limits(depth, depth_range)
    with files.atomic_write(os.path.join(output_dir, f'{stem}_depth.npy'), 'wb') as f:
      np.save(f, depth)
    with files.atomic_write(os.path.join(output_dir, f'{stem}_depth.png'), 'wb') as f:
      Image.fromarray(visualize.colorize_depth(depth, vmin, vmax)).save(f, format='PNG')
    logging.info('%s: depth %.4g..%.4g, colour-mapped over [%.4g, %.4g] (turbo, near = blue).',
                 stem, depth.min(), depth.max(), vmin, vmax)
  if 'aif' in outputs:
    aif = outputs['aif'].astype(np.float32)
    with files.atomic_write(os.path.join(output_dir, f'{stem}_aif.npy'), 'wb') as f:
      np.save(f, aif)
    with files.atomic_write(os.path.join(output_dir, f'{stem}_aif.png'), 'wb') as f:
      Image.fromarray(images.unit_to_uint8(aif)).save(f, format='PNG')


def predict_files(forward: Forward, paths: Sequence[str], output_dir: str, *, batch_size: int = 8,
                  resize: tuple[int, int] | None = None, pad_mode: str = 'reflect',
                  depth_range: tuple[float, float] | None = None) -> PredictionReport:
  """Predicts ``paths`` in batches of images of one padded size; unreadable files are
  skipped."""
  if batch_size < 1:
    raise ValueError(f'batch_size={batch_size}: must be at least 1.')
  if pad_mode not in PAD_MODES:
    raise ValueError(f'pad_mode={pad_mode!r}: choose one of {PAD_MODES}.')
  output_dir = runtime.local_path(output_dir)
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise NotADirectoryError(f'--output_dir={output_dir} is a file: pass a directory (created '
                             'if missing).')
  report = PredictionReport()
  sizes = {}
  for path in paths:
    try:
      sizes[path] = images.image_size(path)
    except (OSError, ValueError) as e:  # PIL raises these for unreadable or non-image files.
      report.skipped[path] = f'cannot read image: {e}'
  buckets = collections.defaultdict(list)
  for path, size in sizes.items():
    buckets[padded_size(resize or size)].append(path)
  os.makedirs(output_dir, exist_ok=True)
  predicted = progress.Progress(len(sizes), what='Predicting', unit='images',
                                every_s=LOG_EVERY_S)
  for _, bucket in sorted(buckets.items()):
    for i in range(0, len(bucket), batch_size):
      photos, done = [], []
      for path in bucket[i:i + batch_size]:
        try:
          photos.append(images.read_rgb(path, resize))
          done.append(path)
        except (OSError, ValueError) as e:
          report.skipped[path] = f'cannot decode image: {e}'
      if photos:
        try:
          outputs = predict_batch(forward, photos, pad_mode=pad_mode)
        except jax.errors.JaxRuntimeError as e:
          if not runtime.is_out_of_memory(e):
            raise
          raise MemoryError(_out_of_memory(e, photos, batch_size)) from None
        for path, single in zip(done, outputs):
          single = {k: resize_output(v, sizes[path]) for k, v in single.items()}
          write_outputs(output_dir, _stem(path), single, depth_range)
        report.written.extend(done)
      predicted.update(len(bucket[i:i + batch_size]))
  for path, reason in report.skipped.items():
    logging.warning('Skipped %s: %s', path, reason)
  return report


def run(checkpoint: str, input_pattern: str, output_dir: str, *,
        camera: Sequence[float] | None = None, **kwargs) -> PredictionReport:
  """Loads the checkpoint ``checkpoint`` names (`checkpoints.locate`: a run's WORKDIR, a
  checkpoint directory, one step of one) and predicts every image ``input_pattern`` names (see
  ``find_inputs``) taken with ``camera`` (see ``make_forward``); kwargs go to
  ``predict_files``."""
  output_dir = runtime.local_path(output_dir)  # A bad one stops before the model loads.
  paths, skipped = find_inputs(input_pattern)
  model, config, step = checkpoints.load_model(checkpoint)
  logging.info('Loaded %s step %d (heads %s); %d images to predict.', checkpoint, step,
               tuple(config.model.heads), len(paths))
  forward = make_forward(model, camera)
  report = predict_files(forward, paths, output_dir, **kwargs)
  for path, reason in skipped.items():
    logging.warning('Skipped %s: %s', path, reason)
  report.skipped.update(skipped)
  return report
