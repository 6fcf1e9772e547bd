"""What the defocus builders share: features, renderer options, manual-file checks, and rendering
on all cores with progress."""

import collections
import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from hded_jax import defocus
from hded_jax import progress
from hded_jax import runtime

PROGRESS_EVERY_SECS = 30


@dataclasses.dataclass
class DefocusConfig(tfds.core.BuilderConfig):
  """What every defocus builder config has: how ``defocus.render_defocus`` rendered the stored
  images, its mode (``defocus.MODES``) and layer merging (None: the mode's default); training
  renders other cameras the same way."""
  defocus_mode: str = 'd3net'
  sigma_tolerance: float | None = None

  def __post_init__(self):
    if self.defocus_mode not in defocus.MODES:
      raise ValueError(f'Unknown defocus_mode {self.defocus_mode!r}; choose one of '
                       f'{defocus.MODES}.')


class DefocusBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder that renders its examples on ``num_workers`` processes (default 1: in-process).

  The number of workers changes neither the examples nor their order.
  """

  def __init__(self, *, num_workers: int = 1, **kwargs):
    super().__init__(**kwargs)
    if num_workers < 1:
      raise ValueError(f'num_workers must be at least 1, got {num_workers}.')
    self.num_workers = num_workers


def defocus_features(image_shape: Sequence[int], depth_shape: Sequence[int]):
  """The features every defocus builder yields; the training input pipeline relies on them."""
  image_shape = (*image_shape, 3)
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=image_shape, doc='Defocused rendering of `aif`.'),
      'aif': tfds.features.Image(shape=image_shape, doc='All-in-focus (sharp) image.'),
      'depth': tfds.features.Tensor(
          shape=tuple(depth_shape), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB,
          doc='Depth in metres; 0 marks pixels without valid ground truth.'),
      'camera': tfds.features.FeaturesDict(
          {key: tfds.features.Scalar(np.float32) for key in defocus.CAMERA_FIELDS},
          doc='Thin-lens camera used for the rendering (metres).'),
      'index': tfds.features.Scalar(np.int64, doc='Index in the source file / archive order.'),
  })


@functools.cache
def _image_feature(shape: tuple[int, int]) -> tfds.features.Image:
  return tfds.features.Image(shape=(*shape, 3))


def rendered_example(index: int, aif: np.ndarray, depth: np.ndarray, camera: defocus.Camera, *,
                     mode: str, sigma_tolerance: float | None,
                     rendering_depth: np.ndarray | None = None) -> tuple[int, dict[str, Any]]:
  """(index, example): ``aif`` defocused with ``camera`` as seen at ``rendering_depth`` (default:
  ``depth``, the stored ground truth), its images encoded as the features store them (PNG).

  Builders call it where they render, in the worker processes: the one process that writes
  every frame would otherwise, encoding them all, become the bottleneck at about 16 workers.
  """
  image = defocus.render_defocus(aif, depth if rendering_depth is None else rendering_depth,
                                 camera, mode=mode, sigma_tolerance=sigma_tolerance)
  encode = _image_feature(aif.shape[:2]).encode_example
  return index, {'image': encode(image), 'aif': encode(aif), 'depth': depth,
                 'camera': camera_features(camera), 'index': index}


def camera_features(camera: defocus.Camera) -> dict[str, np.float32]:
  """The `camera` feature of an example rendered with ``camera``."""
  return {key: np.float32(value) for key, value in camera.as_dict().items()}


def check_manual_files(
    manual_dir: epath.PathLike, files: Mapping[str, str], dataset: str
) -> dict[str, epath.Path]:
  """Returns {file name: path} for `files` ({name: where to get it}), or says what is missing."""
  manual_dir = epath.Path(manual_dir)
  missing = [name for name in files if not (manual_dir / name).is_file()]
  if missing:
    expected = '\n'.join(f'  {name}  <- {source}' for name, source in files.items())
    if manual_dir.is_dir():
      present = sorted(path.name for path in manual_dir.iterdir())
      found = f'That folder holds: {present or "nothing"}.'
    else:
      found = 'That folder does not exist.'
    raise FileNotFoundError(
        f'{dataset}: missing {", ".join(missing)} in the manual folder {manual_dir}.\n'
        f'{found}\nExpected files (name <- where to get it):\n{expected}\n'
        f'Download them there, or pass --manual_dir=<the folder that holds them>.')
  return {name: manual_dir / name for name in files}


def on_cpu(fn: Callable[..., Any], *args, **kwargs):
  """``fn(*args, **kwargs)`` with JAX on the CPU, as in a worker: the same bytes either way."""
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    return fn(*args, **kwargs)


def _start_worker() -> None:
  # Workers render next to each other, one core each: XLA's CPU backend single-threaded, and
  # neither JAX nor TensorFlow (which encodes the PNGs) on an accelerator, where each worker
  # would claim the memory of one GPU that all of them share. Set before either starts.
  os.environ['CUDA_VISIBLE_DEVICES'] = ''
  runtime.add_xla_flag('--xla_cpu_multi_thread_eigen=false')
  jax.config.update('jax_platforms', 'cpu')


def map_in_order(fn: Callable[[Any], Any], items: Iterable[Any],
                 num_workers: int) -> Iterator[Any]:
  """``fn(item)`` for each item, in order, computed on ``num_workers`` processes.

  One worker computes in this process. More are started with `spawn` (forking a process in
  which JAX runs can deadlock), and at most two items per worker are in flight, so a large
  source is never read whole into memory. ``fn`` must be picklable (a module-level function or
  a ``functools.partial`` of one).
  """
  if num_workers == 1:
    for item in items:
      yield on_cpu(fn, item)
    return
  pool = concurrent.futures.ProcessPoolExecutor(
      num_workers, mp_context=multiprocessing.get_context('spawn'), initializer=_start_worker)
  pending = collections.deque()
  try:
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 2 * num_workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def log_progress(items: Iterable[Any], total: int, what: str) -> Iterator[Any]:
  """Yields ``items`` (frames), logging their progress every 30 s and at the end."""
  return progress.logged(items, total, what=what, unit='frames', every_s=PROGRESS_EVERY_SECS)
