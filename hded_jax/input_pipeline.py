"""Input pipeline: TFDS datasets read as random-access ``array_record`` sources with grain.

grain's iterator state is small JSON that goes into every checkpoint, so a restarted run continues
the data order where it stopped instead of starting over. Each process reads only its own slice of
the data; `sharding.global_batch` assembles the per-process arrays into one array over the mesh.
"""

from collections.abc import Iterator, Mapping, Sequence
import dataclasses
import functools
import math

import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from hded_jax import images

PREPARE_HINT = 'Build it once with `{command}` (see README.md, "Datasets").'


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The TFDS builder of ``config.dataset``, prepared (with ``auto_prepare``, built if need be).

  In a multi-process run only process 0 builds; the others wait for it, then read what it wrote.
  """
  from tfds_builders import registry  # pylint: disable=g-import-not-at-top
  name, data_dir = config.dataset.name, config.dataset.data_dir
  make = functools.partial(registry.builder, name, data_dir=data_dir,
                           config=config.dataset.get('builder_config') or None)
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
  if jax.process_count() == 1:
    builder.download_and_prepare()
    return builder
  failure = None
  if jax.process_index() == 0:
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-exception-caught
      failure = e  # Raised below, once the other processes stop waiting.
  multihost_utils.sync_global_devices(f'dataset_builder: {name} prepared')
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


def data_source(config: ml_collections.ConfigDict, split: str) -> Sequence[Mapping[str, np.ndarray]]:
  return dataset_builder(config).as_data_source(split=split)


def _resize(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
  if array.shape[:2] == tuple(size):
    return array
  h, w = size
  return np.asarray(Image.fromarray(array).resize((w, h), resample))


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Resizes to the training size (aspect not kept, as the authors did) and augments.

  Depth is resized with nearest neighbour so that invalid (0) pixels never blend into valid ones,
  or kept on its stored grid with ``native_depth`` (evaluation protocols that score there). The
  same flip and colour change apply to the defocused image and the AiF target.
  """
  image_size: tuple[int, int]
  hflip: bool = False
  color_jitter: float = 0.0
  native_depth: bool = False

  def __call__(self, example, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    size = tuple(self.image_size)
    image = images.to_network_range(_resize(example['image'], size, Image.BILINEAR))
    aif = images.to_network_range(_resize(example['aif'], size, Image.BILINEAR))
    depth = np.asarray(example['depth'], np.float32)
    if not self.native_depth:
      depth = _resize(depth, size, Image.NEAREST)
    if rng is not None and self.hflip and rng.random() < 0.5:
      image, aif, depth = image[:, ::-1], aif[:, ::-1], depth[:, ::-1]
    if rng is not None and self.color_jitter:
      image, aif = _color_jitter(image, aif, rng, self.color_jitter)
    return {'image': np.ascontiguousarray(image), 'aif': np.ascontiguousarray(aif),
            'depth': np.ascontiguousarray(depth), 'depth_valid': depth > 0}


def _color_jitter(image, aif, rng, strength):
  """Brightness, contrast and per-channel gain, identical on both images."""
  brightness = rng.uniform(-strength, strength)
  contrast = rng.uniform(1 - strength, 1 + strength)
  gain = rng.uniform(1 - strength / 2, 1 + strength / 2, size=3).astype(np.float32)

  def apply(x):
    mean = x.mean()
    return np.clip((x - mean) * contrast + mean + brightness, -1, 1) * gain

  return np.clip(apply(image), -1, 1), np.clip(apply(aif), -1, 1)


class _RandomPreprocess(grain.transforms.RandomMap):

  def __init__(self, preprocess: Preprocess):
    self.preprocess = preprocess

  def random_map(self, example, rng: np.random.Generator):
    return self.preprocess(example, rng)


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the number of '
                     f'processes ({jax.process_count()}).')
  return global_batch_size // jax.process_count()


def train_iterator(config: ml_collections.ConfigDict, source) -> grain.DatasetIterator:
  """An endless, shuffled (reshuffled every epoch), augmented iterator of local batches."""
  if len(source) < config.batch_size:
    raise ValueError(f'The training split has {len(source)} examples, fewer than '
                     f'batch_size={config.batch_size}.')
  ds = grain.MapDataset.source(source)
  ds = ds[jax.process_index()::jax.process_count()]
  ds = ds.seed(config.seed).shuffle().repeat(None)
  ds = ds.random_map(_RandomPreprocess(Preprocess(
      tuple(config.dataset.image_size), hflip=config.dataset.hflip,
      color_jitter=config.dataset.color_jitter)))
  ds = ds.batch(local_batch_size(config.batch_size), drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.dataset.num_threads,
                                            prefetch_buffer_size=config.dataset.prefetch))
  if config.dataset.num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.dataset.num_workers))
  return iter(it)


def eval_batches(config: ml_collections.ConfigDict, source, num_examples: int | None = None,
                 native_depth: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Local batches covering the split once, in order; padding carries ``example_mask`` 0.

  Every process yields the same number of batches (processes must step together).
  """
  preprocess = Preprocess(tuple(config.dataset.image_size), native_depth=native_depth)
  n = len(source) if num_examples is None else min(num_examples, len(source))
  local = local_batch_size(config.eval_batch_size)
  global_size = local * jax.process_count()
  for b in range(math.ceil(n / global_size)):
    start = b * global_size + jax.process_index() * local
    indices = range(start, start + local)
    examples = [preprocess(source[min(i, n - 1)]) for i in indices]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch['example_mask'] = np.array([i < n for i in indices])
    yield batch


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A global training batch of random values with the pipeline's keys, shapes and dtypes."""
  rng = np.random.default_rng(seed)
  n, (h, w) = config.batch_size, tuple(config.dataset.image_size)
  return {'image': rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
          'aif': rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
          'depth': rng.uniform(0.5, 10, (n, h, w)).astype(np.float32),
          'depth_valid': np.ones((n, h, w), bool)}
