"""synthetic_defocus: procedural textured scenes and their defocused renderings, no download.

Each scene is a slanted textured ground plane (farther towards the top) with 3-8 textured
fronto-parallel rectangles and ellipses at random depths in front of it, composited with a
z-buffer so nearer surfaces hide farther ones. Every surface carries colour texture with detail
at all scales (multi-scale noise plus stripes or checkers), so blur is visible everywhere. The
defocused image is rendered with ``hded_jax.defocus`` and the ``nyu`` camera (focused at 2 m),
in the renderer's 'clean' mode (no border darkening).

All depths lie in ``DEPTH_RANGE`` = 0.5-1.95 m, in front of the focal plane, where the blur
sigma falls monotonically from 6.5 to 0.06 px: depth is recoverable from defocus alone, without
the front/back ambiguity of a scene straddling the focal plane.

Example ``index`` i of a split is generated from ``np.random.default_rng((seed, split, i))``,
so the data do not depend on the order or parallelism of generation.
"""

import dataclasses
import functools

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from hded_jax import defocus
from hded_jax import images
from tfds_builders import common

DEPTH_RANGE = (0.5, 1.95)
CAMERA = 'nyu'
_SPLIT_SEEDS = {'train': 0, 'test': 1}


@dataclasses.dataclass
class SyntheticDefocusConfig(common.DefocusConfig):
  """Image size, split sizes and seed; pass one as ``config=`` for a custom variant."""
  defocus_mode: str = 'clean'
  height: int = 128
  width: int = 128
  num_train: int = 1024
  num_test: int = 128
  seed: int = 0


def _texture(rng, height, width):
  """(H, W) pattern in [0, 1]: noise at 1-16 px scales, mixed with stripes or checkers."""
  noise = np.zeros((height, width))
  for scale in (1, 2, 4, 8, 16):
    coarse = rng.random((height // scale + 2, width // scale + 2))
    noise += ndimage.zoom(coarse, scale, order=1)[:height, :width]
  noise = (noise - noise.min()) / (np.ptp(noise) + 1e-6)
  rows, cols = np.mgrid[:height, :width]
  angle = rng.uniform(0, np.pi)
  u = cols * np.cos(angle) + rows * np.sin(angle)
  v = rows * np.cos(angle) - cols * np.sin(angle)
  period = rng.uniform(3, 12)
  pattern = {
      'noise': noise,
      'stripes': 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi)),
      'checkers': (np.floor(u / period) + np.floor(v / period)) % 2,
  }[rng.choice(['noise', 'stripes', 'checkers'])]
  return 0.6 * pattern + 0.4 * noise


def _colourise(rng, pattern):
  """Maps a [0, 1] pattern between a dark and a light random colour: (H, W, 3)."""
  dark, light = rng.uniform(0, 0.45, 3), rng.uniform(0.55, 1, 3)
  if rng.random() < 0.5:
    dark, light = light, dark
  return dark + (light - dark) * pattern[..., None]


def composite(surfaces):
  """Z-buffer: per pixel the nearest surface's depth and colour.

  Args:
    surfaces: (depth, rgb) pairs, depth (H, W) in metres with inf where the surface is absent.

  Returns:
    (rgb (H, W, 3), depth (H, W)).
  """
  depths = np.stack([d for d, _ in surfaces])
  nearest = np.argmin(depths, axis=0)[None]
  depth = np.take_along_axis(depths, nearest, 0)[0]
  rgb = np.take_along_axis(np.stack([c for _, c in surfaces]), nearest[..., None], 0)[0]
  return rgb, depth


def generate_scene(rng, height, width):
  """A random scene: (aif uint8 (H, W, 3), depth float32 (H, W) metres in DEPTH_RANGE)."""
  near, far = DEPTH_RANGE
  rows, cols = np.mgrid[:height, :width] / np.array([height - 1, width - 1])[:, None, None]
  # A plane has inverse depth linear in image coordinates.
  top, bottom = rng.uniform(far - 0.45, far), rng.uniform(near + 0.1, near + 0.7)
  inverse = 1 / top + (1 / bottom - 1 / top) * rows + rng.uniform(-0.2, 0.2) * (cols - 0.5)
  ground = np.clip(1 / inverse, near, far)
  surfaces = [(ground, _colourise(rng, _texture(rng, height, width)))]
  for _ in range(rng.integers(3, 9)):
    centre = rng.uniform(0.1, 0.9, 2)
    radii = rng.uniform(0.06, 0.25, 2)
    offsets = (np.stack([rows, cols]) - centre[:, None, None]) / radii[:, None, None]
    if rng.random() < 0.5:
      inside = np.abs(offsets).max(0) <= 1
    else:
      inside = (offsets**2).sum(0) <= 1
    distance = rng.uniform(near, far - 0.2)
    surfaces.append((np.where(inside, distance, np.inf),
                     _colourise(rng, _texture(rng, height, width))))
  rgb, depth = composite(surfaces)
  return images.unit_to_uint8(rgb), depth.astype(np.float32)


def room_scene(height=480, width=640, seed=0):
  """An NYU-like room for benchmarks and renderer checks, not part of the dataset.

  A floor rising to a back wall at 10 m, a side wall from 0.5 m and a box at 1.2 m, under
  random texture at 1, 4 and 16 px: depths span NYU's 0.5-10 m, so rendering it takes as many
  layers as a real NYU frame. Returns (aif uint8 (H, W, 3), depth float32 (H, W) metres).
  """
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  floor = 1.3 * height / np.maximum(rows - height / 3, 1e-3)
  side_wall = 0.5 + 9.5 * (cols / (width / 3))**2
  depth = np.clip(np.minimum(floor, side_wall), 0.5, 10.0)
  depth[height * 5 // 12:height * 5 // 6, width * 15 // 32:width * 45 // 64] = 1.2
  texture = sum(
      ndimage.zoom(rng.random((-(-height // s), -(-width // s), 3)), (s, s, 1),
                   order=1)[:height, :width] for s in (1, 4, 16)) / 3
  return images.unit_to_uint8(texture), depth.astype(np.float32)


class Builder(common.DefocusBuilder):
  """DatasetBuilder for synthetic_defocus."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticDefocusConfig(name='default', description='128x128, 1024 train / 128 test.'),
      SyntheticDefocusConfig(name='tiny', height=32, width=32, num_train=8, num_test=4,
                             description='32x32, 8 train / 4 test, for tests and smoke runs.'),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    shape = (self.builder_config.height, self.builder_config.width)
    return self.dataset_info_from_configs(
        description=__doc__,
        features=common.defocus_features(shape, shape),
        supervised_keys=('image', 'depth'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    if min(config.height, config.width) < 16:
      raise ValueError(f'Image size {config.height}x{config.width} is too small for the '
                       'scene layout; use at least 16x16.')
    return {
        'train': self._generate_examples('train', config.num_train),
        'test': self._generate_examples('test', config.num_test),
    }

  def _generate_examples(self, split, num_examples):
    config = self.builder_config
    make = functools.partial(make_example, seed=(config.seed, _SPLIT_SEEDS[split]),
                             size=(config.height, config.width), mode=config.defocus_mode,
                             sigma_tolerance=config.sigma_tolerance)
    yield from common.log_progress(
        common.map_in_order(make, range(num_examples), self.num_workers), num_examples,
        f'{self.name}/{config.name} {split}')


def make_example(index: int, *, seed: tuple[int, int], size: tuple[int, int],
                 mode: str, sigma_tolerance: float | None) -> tuple[int, dict]:
  """(index, example) for example ``index`` of the split with seed (seed, split seed)."""
  camera = defocus.CAMERAS[CAMERA]
  aif, depth = generate_scene(np.random.default_rng((*seed, index)), *size)
  return common.rendered_example(index, aif, depth, camera, mode=mode,
                                 sigma_tolerance=sigma_tolerance)
