"""The built-in synthetic_defocus dataset: builds, is deterministic, and its blur encodes depth."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from scipy import ndimage

import tfds_builders.synthetic_defocus as synthetic_defocus
from hded_jax import defocus


class SyntheticDefocusTest(tfds.testing.DatasetBuilderTestCase):
  DATASET_CLASS = synthetic_defocus.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = ['tiny']
  SPLITS = {'train': 8, 'test': 4}
  SKIP_CHECKSUMS = True
  # Nothing is downloaded; the test case only needs an existing folder here.
  EXAMPLE_DIR = os.path.dirname(__file__)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  builder = tfds.builder('synthetic_defocus/tiny', data_dir=tmp_path_factory.mktemp('tfds'))
  builder.download_and_prepare()
  return {split: list(tfds.as_numpy(builder.as_dataset(split=split)))
          for split in ('train', 'test')}


def test_examples_are_regenerated_exactly_from_their_index(tiny):
  camera = defocus.CAMERAS['nyu']
  for split, split_seed in (('train', 0), ('test', 1)):
    for example in tiny[split]:
      rng = np.random.default_rng((0, split_seed, example['index']))
      aif, depth = synthetic_defocus.generate_scene(rng, 32, 32)
      np.testing.assert_array_equal(example['aif'], aif)
      np.testing.assert_array_equal(example['depth'], depth)
      np.testing.assert_array_equal(example['image'], defocus.render_defocus(aif, depth, camera))
      assert example['camera'] == pytest.approx(camera.as_dict())
  train_indices = sorted(int(e['index']) for e in tiny['train'])
  assert train_indices == list(range(8))
  assert not np.array_equal(tiny['train'][0]['aif'], tiny['test'][0]['aif'])


def test_depth_stays_in_front_of_the_focal_plane(tiny):
  near, far = synthetic_defocus.DEPTH_RANGE
  assert far < defocus.CAMERAS['nyu'].focus_distance
  for example in tiny['train'] + tiny['test']:
    assert example['depth'].dtype == np.float32 and example['depth'].shape == (32, 32)
    assert near <= example['depth'].min() and example['depth'].max() <= far


def test_blur_grows_towards_the_camera(tiny):
  # Fraction of the sharp image's high-frequency energy that survives defocus, per depth band.
  kept, total = np.zeros(3), np.zeros(3)
  bands = np.array([0.5, 1.0, 1.5, 1.95])
  for example in tiny['train'] + tiny['test']:
    # pylint: disable-next=cell-var-from-loop
    detail = lambda x: ndimage.laplace(x.astype(np.float64).mean(-1))**2
    band = np.digitize(example['depth'], bands[1:-1])
    kept += np.bincount(band.ravel(), detail(example['image']).ravel(), 3)
    total += np.bincount(band.ravel(), detail(example['aif']).ravel(), 3)
  ratio = kept / total
  assert ratio[0] < ratio[1] < ratio[2] and ratio[0] < 0.2 * ratio[2]


def test_composite_nearer_surface_wins_in_any_order():
  rows, cols = np.mgrid[:8, :8]
  near = (np.where((rows < 5) & (cols < 5), 0.7, np.inf), np.full((8, 8, 3), 0.2))
  far = (np.where((rows > 2) & (cols > 2), 1.5, np.inf), np.full((8, 8, 3), 0.9))
  ground = (np.full((8, 8), 1.9), np.full((8, 8, 3), 0.5))
  for surfaces in ([ground, far, near], [near, far, ground]):
    rgb, depth = synthetic_defocus.composite(surfaces)
    assert depth[3, 3] == 0.7 and rgb[3, 3, 0] == 0.2  # overlap: the near square
    assert depth[6, 6] == 1.5 and rgb[6, 6, 0] == 0.9
    assert depth[0, 7] == 1.9 and rgb[0, 7, 0] == 0.5


def test_scenes_are_deterministic_and_seed_dependent():
  first = synthetic_defocus.generate_scene(np.random.default_rng((0, 0, 3)), 32, 48)
  again = synthetic_defocus.generate_scene(np.random.default_rng((0, 0, 3)), 32, 48)
  other = synthetic_defocus.generate_scene(np.random.default_rng((1, 0, 3)), 32, 48)
  assert first[0].shape == (32, 48, 3) and first[1].shape == (32, 48)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


def test_too_small_images_are_rejected(tmp_path):
  config = synthetic_defocus.SyntheticDefocusConfig(name='mini', height=8, width=8)
  builder = synthetic_defocus.Builder(config=config, data_dir=tmp_path)
  with pytest.raises(ValueError, match='at least 16x16'):
    builder.download_and_prepare()
