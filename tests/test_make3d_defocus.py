"""The Make3D defocus builder on tiny copies of the four official .tar.gz archives."""

import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hded_jax import defocus
from hded_jax import images
from hded_jax import input_pipeline
from tests.fixtures import defocus_sources
from tfds_builders.make3d_defocus import make3d_defocus_dataset_builder as make3d

IMAGE_HW = (80, 60)  # Portrait like the real 2272x1704 frames.
DEPTH_HW = (11, 7)  # Not square, like the real 55x305 grid.
CONFIG = make3d.Make3dDefocusConfig(
    name='test_small', image_size=(64, 48), depth_size=DEPTH_HW, max_depth=70.0)
TRAIN_NAMES = ('op1-p-001t000', 'op2-p-102t000', 'sun-p-003t000')
TEST_NAMES = ('10.21op2-p-015t000', 'campus-p-200t000')


def make_item(k: int) -> tuple[np.ndarray, np.ndarray]:
  """A dark image with a bright top-left block; depth 5..30 m with special values."""
  rgb = np.full((*IMAGE_HW, 3), 40, np.uint8)
  rgb[:IMAGE_HW[0] // 2, :IMAGE_HW[1] // 2] = 240
  depth = np.linspace(5, 30, DEPTH_HW[0] * DEPTH_HW[1]).reshape(DEPTH_HW)
  depth[0, 0] = 100 + k  # Far and invalid; the marker tells items apart.
  depth[0, 1] = 70.0  # At the cap: invalid.
  depth[0, 2] = 69.9  # Just below: valid.
  depth[1, 0] = np.nan  # No laser return.
  depth[1, 1] = -1.0
  depth[-1, -1] = 2.0 + k  # Valid, item-specific.
  return rgb, depth


def write_sources(manual_dir: pathlib.Path) -> dict[str, np.ndarray]:
  """Writes the archives; returns {name: depth}. The depth archives list names in reverse."""
  items = {name: make_item(k) for k, name in enumerate(TRAIN_NAMES + TEST_NAMES)}
  defocus_sources.write_make3d_archives(
      manual_dir,
      train={name: items[name] for name in TRAIN_NAMES},
      test={name: items[name] for name in TEST_NAMES})
  # Reorder the depth archives so that pairing must go by name, not position.
  for archive, folder, names in (('Train400Depth.tgz', 'Train400Depth', TRAIN_NAMES),
                                 ('Test134Depth.tar.gz', 'Gridlaserdata', TEST_NAMES)):
    defocus_sources.write_tar_gz(manual_dir / archive, {
        f'{folder}/depth_sph_corr-{name}.mat':
            defocus_sources.make3d_depth_mat_bytes(items[name][1])
        for name in reversed(names)})
  return {name: depth for name, (_, depth) in items.items()}


def build(manual_dir, data_dir, config=CONFIG) -> tfds.core.DatasetBuilder:
  builder = make3d.Builder(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


class Make3dDefocusTest(defocus_sources.ManualSourcesTestCase):
  DATASET_CLASS = make3d.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [CONFIG]
  SPLITS = {'train': len(TRAIN_NAMES), 'test': len(TEST_NAMES)}
  write_sources = staticmethod(write_sources)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds the dataset once; returns (builder, {name: source depth})."""
  root = tmp_path_factory.mktemp('make3d')
  manual_dir = root / 'manual'
  manual_dir.mkdir()
  depths = write_sources(manual_dir)
  return build(manual_dir, root / 'data'), depths


def examples(builder, split):
  return sorted(tfds.as_numpy(builder.as_dataset(split=split)), key=lambda ex: ex['index'])


def expected_depth(source: np.ndarray) -> np.ndarray:
  valid = np.isfinite(source) & (source > 0) & (source < 70)
  return np.where(valid, source, 0).astype(np.float32)


@pytest.mark.parametrize('split,names', [('train', TRAIN_NAMES), ('test', TEST_NAMES)])
def test_depth_is_native_paired_by_name_and_invalid_is_zero(built, split, names):
  builder, depths = built
  exs = examples(builder, split)
  assert [ex['index'] for ex in exs] == list(range(len(names)))  # Image-archive order.
  for ex, name in zip(exs, names):
    np.testing.assert_array_equal(ex['depth'], expected_depth(depths[name]))
    assert ex['depth'][0, 2] == pytest.approx(69.9)
    assert (ex['depth'][:2, :2] == 0).all()


def test_aif_is_resized_upright(built):
  builder, _ = built
  for ex in examples(builder, 'train'):
    aif = ex['aif'].astype(np.float32)
    assert aif.shape == (64, 48, 3) and ex['image'].shape == (64, 48, 3)
    # The bright block is the top-left quarter, 32x24 after resizing.
    assert aif[:28, :20].min() > 220
    for corner in (aif[-28:, :20], aif[:28, -20:], aif[-28:, -20:]):
      assert corner.max() < 60


def test_camera_is_the_make3d_preset(built):
  builder, _ = built
  camera = examples(builder, 'test')[0]['camera']
  assert camera == pytest.approx(defocus.camera_preset('make3d').as_dict())


def test_rendering_clamps_far_and_missing_depth_to_the_cap(tmp_path):
  """A frame of all-missing or all-far depth renders exactly like one at 70 m."""
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 255, (*IMAGE_HW, 3), dtype=np.uint8)
  sources = {'a-missing': np.full(DEPTH_HW, np.nan), 'b-far': np.full(DEPTH_HW, 81.9),
             'c-cap': np.full(DEPTH_HW, 70.0), 'd-near': np.full(DEPTH_HW, 1.5)}
  defocus_sources.write_make3d_archives(
      tmp_path, train={name: (rgb, depth) for name, depth in sources.items()},
      test={'e': (rgb, np.full(DEPTH_HW, 9.0))})
  missing, far, cap, near = examples(build(tmp_path, tmp_path / 'data'), 'train')
  np.testing.assert_array_equal(missing['image'], cap['image'])
  np.testing.assert_array_equal(far['image'], cap['image'])
  assert (missing['depth'] == 0).all() and (far['depth'] == 0).all()
  # The far frame is blurred, and the near one (1.5 m, focus at 5 m) more so.
  aif = cap['aif'].astype(np.float32)
  change = lambda ex: np.abs(ex['image'].astype(np.float32) - aif)[12:-12, 12:-12].mean()
  assert 2 < change(cap) < change(near)


def test_missing_archives_are_named_with_the_folder(tmp_path):
  write_sources(tmp_path)
  (tmp_path / 'Test134Depth.tar.gz').unlink()
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path, tmp_path / 'data')
  message = str(e.value)
  assert f'missing Test134Depth.tar.gz in the manual folder {tmp_path}' in message
  assert 'http://make3d.cs.cornell.edu/data.html' in message
  for name in make3d.MANUAL_FILES:
    assert name in message


def test_unpaired_images_are_reported(tmp_path):
  depths = write_sources(tmp_path)
  defocus_sources.write_tar_gz(tmp_path / 'Train400Depth.tgz', {
      f'Train400Depth/depth_sph_corr-{name}.mat':
          defocus_sources.make3d_depth_mat_bytes(depths[name]) for name in TRAIN_NAMES[:2]})
  with pytest.raises(ValueError, match=TRAIN_NAMES[2]):
    build(tmp_path, tmp_path / 'data')


def test_a_corrupt_archive_is_named(tmp_path):
  write_sources(tmp_path)
  (tmp_path / 'Test134.tar.gz').write_bytes(b'<html>404 Not Found</html>')
  with pytest.raises(ValueError, match='Test134.tar.gz as a .tar.gz'):
    build(tmp_path, tmp_path / 'data')


def test_a_depth_grid_of_another_size_is_rejected(tmp_path):
  write_sources(tmp_path)
  with pytest.raises(ValueError, match=r'Position3DGrid of shape \(55, 305, 4\)'):
    build(tmp_path, tmp_path / 'data', config=make3d.Builder.BUILDER_CONFIGS[0])


def test_configs_store_d3net_by_default_and_clean_on_request(built):
  assert {c.name: c.defocus_mode for c in make3d.Builder.BUILDER_CONFIGS} == {
      '384x288': 'd3net', '384x288_clean': 'clean'}
  builder, depths = built
  ex = examples(builder, 'train')[0]
  valid_depth = expected_depth(depths[TRAIN_NAMES[0]])
  rendering_depth = make3d.resize_depth(np.where(valid_depth > 0, valid_depth, 70.0),
                                        CONFIG.image_size)
  np.testing.assert_array_equal(ex['image'], defocus.render_defocus(
      ex['aif'], rendering_depth, defocus.camera_preset('make3d'), mode='d3net',
      sigma_tolerance=0))


def test_rendering_with_its_own_camera_gives_the_stored_images(built):
  """What training renders with config.dataset.camera (the input pipeline's render depth: the
  coarse grid upsampled, invalid pixels at 70 m; `Rendering` at the stored size) reproduces the
  builder's d3net images."""
  builder, _ = built
  choice = input_pipeline.CameraChoice.from_config({'focus_distance': 5.0})
  preprocess = input_pipeline.Preprocess(CONFIG.image_size, camera=choice, fill_depth=70.0)
  rendering = input_pipeline.Rendering(mode='d3net', sigma_tolerance=0.0, scale=(1.0, 1.0),
                                       dilation_radius=defocus.DILATION_RADIUS)
  exs = examples(builder, 'train')
  batch = [preprocess(ex) for ex in exs]
  batch = {k: np.stack([b[k] for b in batch]) for k in batch[0]}
  rendered = images.to_uint8(jax.jit(rendering)(batch)['image']).astype(np.float32)
  difference = np.abs(rendered - np.stack([ex['image'] for ex in exs]))
  assert difference.mean() <= 0.1 and difference.max() <= 1
