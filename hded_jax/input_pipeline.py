"""Input pipeline: TFDS datasets read as random-access ``array_record`` sources with grain.

grain's iterator state is small JSON that goes into every checkpoint, so a restarted run continues
the data order where it stopped instead of starting over. Each process reads only its own slice of
the data; `sharding.global_batch` assembles the per-process arrays into one array over the mesh.
Each example is read, decoded and resized once and kept (`ResizedSource`); what is random (flips,
colour changes, cameras) and what follows from it (blur maps) is drawn afresh every epoch.

Every example carries its camera and its blur map. With ``config.dataset.camera`` set, the
pipeline draws each example's camera and leaves out the stored defocused image: the jitted train
and eval steps render it (`Rendering`) from the AiF image and the depth.
"""

from collections.abc import Iterator, Mapping, Sequence
from concurrent import futures
import dataclasses
import functools
import math

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from orbax.checkpoint import multihost
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from hded_jax import defocus
from hded_jax import images
from hded_jax import runtime

PREPARE_HINT = 'Build it once with `{command}` (see README.md, "Datasets").'
# How long the other processes of a run wait for process 0 to build a dataset on first use
# (with auto_prepare on a dataset of manual files, e.g. NYU: minutes on many cores, an hour or
# more on a few).
BUILD_WAIT_SECS = 6 * 3600


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``config.dataset``, prepared (with ``auto_prepare``, built if need be).

  In a multi-process run only process 0 builds; the others wait for it, then read what it wrote.
  """
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  name = config.dataset.name
  make = functools.partial(_builder, config)
  builder = make()
  if builder.is_prepared():
    return builder
  if not config.dataset.get('auto_prepare', False):
    raise FileNotFoundError(
        f'Dataset {name}/{builder.builder_config.name} is not prepared in '
        f'{builder.data_dir_root}. ' + PREPARE_HINT.format(
            command=registry.prepare_command(builder)))
  logging.info('Building %s/%s in %s (first run only).', name, builder.builder_config.name,
               builder.data_dir_root)
  runtime.tensorflow()  # Before TFDS's build starts its runtime.
  # As `python -m tfds_builders.prepare` builds it: on every core this process may use.
  prepare = functools.partial(
      registry.prepare, name, data_dir=builder.data_dir_root,
      config=builder.builder_config.name, num_workers=runtime.usable_cores())
  if jax.process_count() == 1:
    return prepare()
  failure = None
  if jax.process_index() == 0:
    try:
      prepare()
    except Exception as e:  # pylint: disable=broad-exception-caught
      failure = e  # Raised below, once the other processes stop waiting.
  # The coordination service's barrier, not a collective over the devices: on the CPU, gloo
  # gives up on a process that has not joined within 30 s, and a build can take longer.
  multihost.sync_global_processes(
      f'dataset_builder: {name}/{builder.builder_config.name} prepared',
      timeout=BUILD_WAIT_SECS, processes=set(range(jax.process_count())))
  if failure is not None:
    raise failure
  builder = make()
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'Process 0 built {name}/{builder.builder_config.name} in {builder.data_dir_root}, but '
        f'process {jax.process_index()} does not find it there (or process 0 failed: see its '
        'log). Use a data_dir that every process shares, or prepare the dataset on each host: '
        f'`{registry.prepare_command(builder)}`.')
  return builder


def _builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of ``config.dataset``, prepared or not (its configuration and features)."""
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  return registry.builder(config.dataset.name, data_dir=config.dataset.data_dir,
                          config=config.dataset.get('builder_config') or None)


def data_source(config: ml_collections.ConfigDict,
                split: str) -> Sequence[Mapping[str, np.ndarray]]:
  return dataset_builder(config).as_data_source(split=split)


@dataclasses.dataclass(frozen=True)
class CameraChoice:
  """``config.dataset.camera``: per field of ``defocus.Camera``, None (each example's own), a
  value, or a (low, high) range drawn uniformly for every training example. Evaluation takes
  each range's middle. Lengths in metres; the pixel size is the camera's at the resolution the
  dataset stores (its ``camera`` feature's)."""
  ranges: tuple[tuple[float, float] | None, ...]

  @classmethod
  def from_config(cls, camera: ml_collections.ConfigDict | None) -> 'CameraChoice | None':
    """None when no field is set (or configs from before the field have none): the stored
    defocused images are used."""
    if camera is None:
      return None
    if unknown := sorted(set(camera) - set(defocus.CAMERA_FIELDS)):
      raise ValueError(f'config.dataset.camera has unknown fields {unknown}; its fields are '
                       f'{defocus.CAMERA_FIELDS}.')
    ranges = []
    for name in defocus.CAMERA_FIELDS:
      value = camera.get(name)
      if value is not None:
        bounds = (value, value) if isinstance(value, (int, float)) else tuple(value)
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
          raise ValueError(
              f'config.dataset.camera.{name}={value!r}: give a positive value or a range '
              '(low, high) with 0 < low <= high, in metres (the f-number: a ratio).')
        value = (float(bounds[0]), float(bounds[1]))
      ranges.append(value)
    return cls(tuple(ranges)) if any(r is not None for r in ranges) else None

  def sample(self, own: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """The (4,) camera of one example: drawn with ``rng``, or each range's middle without."""
    camera = np.array(own, np.float32)
    for i, bounds in enumerate(self.ranges):
      if bounds is not None:
        low, high = bounds
        camera[i] = (low + high) / 2 if rng is None or low == high else rng.uniform(low, high)
    defocus.Camera(*map(float, camera))  # Raises if the lens cannot focus there.
    return camera


def camera_array(example) -> np.ndarray:
  """The (4,) float32 camera of a dataset example (``defocus.CAMERA_FIELDS`` order)."""
  return np.array([example['camera'][name] for name in defocus.CAMERA_FIELDS], np.float32)


def blur_map(depth: np.ndarray, camera: np.ndarray) -> np.ndarray:
  """Signed blur sigma in the camera's pixels (``defocus.signed_blur_sigma_px``: negative in
  front of the focal plane), 0 where the depth is invalid (0)."""
  valid = depth > 0
  sigma = defocus.signed_blur_sigma_px(np.where(valid, depth, 1), defocus.Camera(
      *map(float, camera)))
  return np.where(valid, sigma, 0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Resizes to the training size (aspect not kept, as the authors did) and augments.

  Depth is resized with nearest neighbour so that invalid (0) pixels never blend into valid ones,
  or kept on its stored grid with ``native_depth`` (evaluation protocols that score there). The
  same flip and colour change apply to the defocused image and the AiF target. ``blur`` is the
  signed blur map on the depth's grid, in the camera's pixels (`blur_map`).

  With ``camera`` (a `CameraChoice`) the example's camera is drawn (training) or fixed (no
  ``rng``), the stored ``image`` is left out, and ``render_depth`` holds what the steps render
  with (`Rendering`): the depth at the training size, invalid pixels at ``fill_depth`` (None:
  the example's farthest valid depth).
  """
  image_size: tuple[int, int]
  hflip: bool = False
  color_jitter: float = 0.0
  native_depth: bool = False
  camera: CameraChoice | None = None
  fill_depth: float | None = None

  def __call__(self, example, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    return self.augmented(self.resized(example), rng)

  def resized(self, example) -> dict[str, np.ndarray]:
    """The part that is the same every epoch (what `ResizedSource` keeps): the images
    resized (uint8), the depths, the example's own camera."""
    size = tuple(self.image_size)
    out = {'aif': images.resize(example['aif'], size, Image.BILINEAR)}
    if self.camera is None:
      out['image'] = images.resize(example['image'], size, Image.BILINEAR)
    stored_depth = np.asarray(example['depth'], np.float32)
    out['depth'] = (stored_depth if self.native_depth
                    else images.resize(stored_depth, size, Image.NEAREST))
    if self.camera is not None:
      valid = stored_depth > 0
      fill = self.fill_depth or (stored_depth.max() if valid.any() else 1.0)
      # As the builders rendered: a depth on the image's grid resized like `depth` (blending
      # depths across occlusion edges would blur them as one layer), a coarser grid
      # (Make3D's) upsampled bilinearly.
      on_image_grid = stored_depth.shape == example['aif'].shape[:2]
      out['render_depth'] = images.resize(np.where(valid, stored_depth, fill), size,
                                          Image.NEAREST if on_image_grid else Image.BILINEAR)
    out['camera'] = camera_array(example)
    return out

  def augmented(self, resized: Mapping[str, np.ndarray],
                rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """A `resized` example scaled to [-1, 1], flipped and colour-changed (with ``rng``),
    with its camera (drawn with ``rng``) and blur map. Writes nothing into ``resized``."""
    out = {k: v for k, v in resized.items() if k != 'camera'}
    out.update({k: images.to_network_range(out[k]) for k in ('aif', 'image') if k in out})
    if rng is not None and self.hflip and rng.random() < 0.5:
      out = {k: v[:, ::-1] for k, v in out.items()}
    if rng is not None and self.color_jitter:
      jitter = _color_jitter(rng, self.color_jitter)
      out.update({k: jitter(out[k]) for k in ('image', 'aif') if k in out})
    camera = resized['camera']
    if self.camera is not None:
      camera = self.camera.sample(camera, rng)
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    out.update(depth_valid=out['depth'] > 0, blur=blur_map(out['depth'], camera), camera=camera)
    return out


def _color_jitter(rng, strength):
  """A brightness, contrast and per-channel gain change, drawn once for the input and the AiF."""
  brightness = rng.uniform(-strength, strength)
  contrast = rng.uniform(1 - strength, 1 + strength)
  gain = rng.uniform(1 - strength / 2, 1 + strength / 2, size=3).astype(np.float32)

  def apply(x):
    mean = x.mean()
    return np.clip(np.clip((x - mean) * contrast + mean + brightness, -1, 1) * gain, -1, 1)

  return apply


@dataclasses.dataclass(frozen=True)
class Rendering:
  """Renders a batch's network input inside the jitted steps, from its ``aif``, ``render_depth``
  and ``camera``, as the dataset's builder rendered the stored images (its renderer mode and
  layer merging) but at the input size: ``scale`` (rows, columns) converts the camera's pixels,
  those of the stored images, to the input's, and D3-Net's 4-pixel mask dilation scales with
  their geometric mean. The batch is rendered as one vectorised program (``jax.vmap``).
  """
  mode: str
  sigma_tolerance: float | None
  scale: tuple[float, float]
  dilation_radius: int

  def __call__(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """``batch`` with its ``image``: the defocused input in [-1, 1]."""
    render = functools.partial(
        defocus.render_defocus, mode=self.mode, sigma_tolerance=self.sigma_tolerance,
        dilation_radius=self.dilation_radius, scale=self.scale)
    aif = images.to_clipped_unit_range(batch['aif'])
    cameras = defocus.Camera(*jnp.moveaxis(batch['camera'], -1, 0))
    image = jax.vmap(render)(aif, batch['render_depth'], cameras)
    return {**batch, 'image': images.from_unit_range(image)}


def rendering(config: ml_collections.ConfigDict) -> Rendering | None:
  """How the steps render their inputs with ``config.dataset.camera``; None without it."""
  if CameraChoice.from_config(config.dataset.get('camera')) is None:
    return None
  return builder_rendering(_builder(config), tuple(config.dataset.image_size))


def builder_rendering(builder: tfds.core.DatasetBuilder,
                      image_size: tuple[int, int]) -> Rendering:
  """Rendering as ``builder`` rendered its stored images, at ``image_size`` (H, W)."""
  stored = builder.info.features['image'].shape[:2]
  scale = (image_size[0] / stored[0], image_size[1] / stored[1])
  return Rendering(mode=builder.builder_config.defocus_mode,
                   sigma_tolerance=builder.builder_config.sigma_tolerance, scale=scale,
                   dilation_radius=max(1, round(defocus.DILATION_RADIUS * math.sqrt(
                       scale[0] * scale[1]))))


def preprocess(config: ml_collections.ConfigDict, **kwargs) -> Preprocess:
  """The `Preprocess` of ``config.dataset`` (kwargs: augmentation, ``native_depth``)."""
  return Preprocess(tuple(config.dataset.image_size),
                    camera=CameraChoice.from_config(config.dataset.get('camera')),
                    fill_depth=config.dataset.max_depth, **kwargs)


class ResizedSource:
  """``source``'s examples through ``preprocess.resized``, each kept in memory after its first
  read where this process's share of the split fits in ``max_bytes``: decoding the stored
  images and depths and resizing them are most of an example's preprocessing, and give the
  same arrays every epoch (docs/performance.md). Random access, as grain reads a source."""

  def __init__(self, source, preprocess: Preprocess, max_bytes: float):
    self.source, self.preprocess = source, preprocess
    first = self._read(0) if len(source) else {}
    share = math.ceil(len(source) / jax.process_count())
    self.nbytes = share * sum(v.nbytes for v in first.values())
    self._kept = {0: first} if first and self.nbytes <= max_bytes else None

  @property
  def keeps_examples(self) -> bool:
    return self._kept is not None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    if self._kept is None:
      return self._read(index)
    index = int(index)
    if (example := self._kept.get(index)) is None:
      # Two threads may read one example at once at first: the later keeps an equal copy.
      example = self._kept[index] = self._read(index)
    return example

  def _read(self, index) -> dict[str, np.ndarray]:
    resized = {k: v.view() for k, v in self.preprocess.resized(self.source[index]).items()}
    for v in resized.values():
      v.flags.writeable = False  # Every epoch reads these same arrays.
    return resized


def resized_source(config: ml_collections.ConfigDict, source, prepare: Preprocess
                   ) -> ResizedSource:
  """``source`` for ``prepare``, its examples kept in memory within
  ``config.dataset.keep_resized_gb`` (per process; 0: none)."""
  max_gb = config.dataset.get('keep_resized_gb', 0.0)
  resized = ResizedSource(source, prepare, max_gb * 1e9)
  if resized.keeps_examples:
    logging.info('Keeping the %d examples in memory once read and resized: %.2f GB in this '
                 'process (dataset.keep_resized_gb=%g).', len(source), resized.nbytes / 1e9,
                 max_gb)
  else:
    logging.info('Reading and resizing the %d examples every epoch: keeping them would take '
                 '%.2f GB in this process, over dataset.keep_resized_gb=%g.', len(source),
                 resized.nbytes / 1e9, max_gb)
  return resized


class _RandomAugment(grain.transforms.RandomMap):

  def __init__(self, preprocess: Preprocess):
    self.preprocess = preprocess

  def random_map(self, example, rng: np.random.Generator):
    return self.preprocess.augmented(example, rng)


def batch_spec(config: ml_collections.ConfigDict, source,
               sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global training batch's shapes and dtypes, from one example of ``source`` through the
  training preprocessing: what the train step compiles for before the first batch exists."""
  example = preprocess(config)(source[0])
  return {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape), v.dtype, sharding=sharding)
          for k, v in example.items()}


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the number of '
                     f'processes ({jax.process_count()}).')
  return global_batch_size // jax.process_count()


# The most preprocessing threads by default (grain's own default): they share one GIL.
MAX_AUTO_THREADS = 16


def preprocessing_threads(config: ml_collections.ConfigDict) -> int:
  """``config.dataset.num_threads``, or one per host core up to ``MAX_AUTO_THREADS``: on a
  GPU host a bf16 step trains faster than a few threads prepare its batches
  (docs/performance.md). The threads share the GIL; worker processes
  (``dataset.num_workers``) do not."""
  return config.dataset.num_threads or min(runtime.usable_cores(), MAX_AUTO_THREADS)


def train_iterator(config: ml_collections.ConfigDict, source) -> grain.DatasetIterator:
  """An endless, shuffled (reshuffled every epoch), augmented iterator of local batches."""
  if len(source) < config.batch_size:
    raise ValueError(f'The training split has {len(source)} examples, fewer than '
                     f'batch_size={config.batch_size}.')
  prepare = preprocess(config, hflip=config.dataset.hflip,
                       color_jitter=config.dataset.color_jitter)
  ds = grain.MapDataset.source(resized_source(config, source, prepare))
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.seed(config.seed).shuffle().repeat(None)
  ds = ds.random_map(_RandomAugment(prepare))
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  # Each thread prepares a whole batch, and only the batches in the buffer are being prepared:
  # a buffer smaller than the threads would leave some idle.
  threads = preprocessing_threads(config)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(config.dataset.prefetch, threads)))
  if config.dataset.num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.dataset.num_workers))
  return iter(it)


def eval_source(config: ml_collections.ConfigDict, source,
                native_depth: bool = False) -> ResizedSource:
  """``source`` as `eval_batches` reads it (``native_depth``: the depth kept on its stored
  grid); one kept across evaluations reads each example once."""
  return resized_source(config, source, preprocess(config, native_depth=native_depth))


def eval_batches(config: ml_collections.ConfigDict, source: ResizedSource,
                 num_examples: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Local batches covering the split (an `eval_source`) once, in order; padding carries
  ``example_mask`` 0.

  Every process yields the same number of batches (processes must step together). A batch's
  examples are prepared by ``preprocessing_threads`` threads, as training's are.
  """
  prepare = source.preprocess
  n = len(source) if num_examples is None else min(num_examples, len(source))
  local = local_batch_size(config.eval_batch_size)
  global_size = local * jax.process_count()
  with futures.ThreadPoolExecutor(preprocessing_threads(config),
                                  thread_name_prefix='eval_preprocess') as pool:
    for b in range(math.ceil(n / global_size)):
      start = b * global_size + jax.process_index() * local
      indices = range(start, start + local)
      examples = list(pool.map(lambda i: prepare.augmented(source[min(i, n - 1)]), indices))
      batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
      batch['example_mask'] = np.array([i < n for i in indices])
      yield batch
