"""The NYU Depth v2 defocus builder on a tiny labeled .mat written in MATLAB's v7.3 layout."""

import pathlib

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hded_jax import defocus
from tests.fixtures import defocus_sources
from tfds_builders.nyu_depth_v2_defocus import nyu_depth_v2_defocus_dataset_builder as nyu

H, W = 32, 160  # Not square, so a swapped H/W axis cannot go unnoticed.
# Depth bands (metres) for the blur check, 32 columns each.
BANDS = (1.0, 2.0, 3.0, 5.0, 10.0)
TRAIN, TEST = [1, 3, 4], [2, 5]  # 1-based, as in splits.mat.


def small_config(focus_distance: float = 2.0) -> nyu.NyuDefocusConfig:
  return nyu.NyuDefocusConfig(name=f'test_{H}x{W}_focus_{focus_distance:g}m', height=H, width=W,
                              focus_distance=focus_distance)


def make_frames() -> tuple[np.ndarray, np.ndarray]:
  """Five textured frames with a bright top-left corner; depth grows along columns."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 160, (5, H, W, 3), dtype=np.uint8)
  images[:, :4, :6] = 255
  depths = np.empty((5, H, W), np.float32)
  depths[:] = np.repeat(np.asarray(BANDS, np.float32), W // len(BANDS))
  depths += np.arange(5, dtype=np.float32)[:, None, None] * 0.01  # Tells frames apart.
  depths[:, 0, 0] = 7.5  # An asymmetric marker at the top-left pixel.
  return images, depths


def write_sources(manual_dir: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  images, depths = make_frames()
  defocus_sources.write_nyu_labeled_mat(manual_dir / nyu.LABELED_MAT, images, depths)
  defocus_sources.write_nyu_splits_mat(manual_dir / nyu.SPLITS_MAT, TRAIN, TEST)
  return images, depths


def build(config, manual_dir, data_dir) -> tfds.core.DatasetBuilder:
  builder = nyu.Builder(config=config, data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


class NyuDepthV2DefocusTest(defocus_sources.ManualSourcesTestCase):
  DATASET_CLASS = nyu.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [small_config()]
  SPLITS = {'train': len(TRAIN), 'test': len(TEST)}
  write_sources = staticmethod(write_sources)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds the dataset once at focus 2 m; returns (builder, images, depths)."""
  root = tmp_path_factory.mktemp('nyu')
  manual_dir = root / 'manual'
  manual_dir.mkdir()
  images, depths = write_sources(manual_dir)
  return build(small_config(), manual_dir, root / 'data'), images, depths


def examples(builder, split):
  return sorted(tfds.as_numpy(builder.as_dataset(split=split)), key=lambda ex: ex['index'])


def test_splits_follow_splits_mat(built):
  builder, _, _ = built
  assert [ex['index'] for ex in examples(builder, 'train')] == [i - 1 for i in TRAIN]
  assert [ex['index'] for ex in examples(builder, 'test')] == [i - 1 for i in TEST]


def test_aif_and_depth_come_out_upright_and_exact(built):
  builder, images, depths = built
  for ex in examples(builder, 'train') + examples(builder, 'test'):
    i = ex['index']
    assert ex['aif'].shape == (H, W, 3) and ex['depth'].shape == (H, W)
    np.testing.assert_array_equal(ex['aif'], images[i])
    np.testing.assert_array_equal(ex['depth'], depths[i])
    assert (ex['aif'][:4, :6] == 255).all() and ex['depth'][0, 0] == 7.5
    assert ex['depth'][1, 0] == pytest.approx(BANDS[0] + 0.01 * i)
    assert ex['depth'][-1, -1] == pytest.approx(BANDS[-1] + 0.01 * i)


def test_camera_is_the_rendering_camera(built):
  builder, _, _ = built
  camera = examples(builder, 'test')[0]['camera']
  expected = defocus.camera_preset('nyu', focus_distance=2.0).as_dict()
  assert camera == pytest.approx(expected)


def band_blur(image, aif) -> list[float]:
  """Mean absolute change per depth band, away from the band edges and the marker."""
  diff = np.abs(image.astype(np.float32) - aif.astype(np.float32))
  width = W // len(BANDS)
  return [float(diff[8:-8, k * width + 10:(k + 1) * width - 10].mean())
          for k in range(len(BANDS))]


def test_blur_grows_away_from_the_focus_distance(built):
  builder, _, _ = built
  ex = examples(builder, 'train')[0]
  blur = band_blur(ex['image'], ex['aif'])
  # BANDS = 1, 2, 3, 5, 10 m; in focus at 2 m.
  assert blur[1] < 2 < blur[2] < blur[3] < blur[4]
  assert blur[0] > blur[2]


def test_refocused_config_moves_the_sharp_band(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  write_sources(manual_dir)
  builder = build(small_config(focus_distance=10.0), manual_dir, tmp_path / 'data')
  ex = examples(builder, 'train')[0]
  assert ex['camera']['focus_distance'] == 10.0
  blur = band_blur(ex['image'], ex['aif'])
  assert blur[4] < 2 < blur[3] < blur[2] < blur[1] < blur[0]


def test_missing_files_are_named_with_their_urls_and_the_folder(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  defocus_sources.write_nyu_splits_mat(manual_dir / nyu.SPLITS_MAT, TRAIN, TEST)
  with pytest.raises(FileNotFoundError) as e:
    build(small_config(), manual_dir, tmp_path / 'data')
  message = str(e.value)
  assert f'missing {nyu.LABELED_MAT} in the manual folder {manual_dir}' in message
  for url in nyu.MANUAL_FILES.values():
    assert url in message


def test_a_non_hdf5_labeled_file_is_rejected(tmp_path):
  write_sources(tmp_path)
  (tmp_path / nyu.LABELED_MAT).write_bytes(b'MATLAB 5.0 MAT-file' + bytes(200))
  with pytest.raises(ValueError, match='not a MATLAB v7.3'):
    build(small_config(), tmp_path, tmp_path / 'data')


def test_frames_of_another_size_are_rejected(tmp_path):
  write_sources(tmp_path)
  with pytest.raises(ValueError, match=r'\(N, 3, 640, 480\)'):
    build(nyu.Builder.BUILDER_CONFIGS[0], tmp_path, tmp_path / 'data')


def test_split_indices_beyond_the_file_are_rejected(tmp_path):
  write_sources(tmp_path)
  defocus_sources.write_nyu_splits_mat(tmp_path / nyu.SPLITS_MAT, [1, 2], [6])
  with pytest.raises(ValueError, match=r'outside 1\.\.5'):
    build(small_config(), tmp_path, tmp_path / 'data')


def test_real_file_layout_is_images_n_3_w_h(tmp_path):
  """The fixture really is MATLAB's layout: reversed axes on disk, v7.3 header."""
  write_sources(tmp_path)
  path = tmp_path / nyu.LABELED_MAT
  assert path.read_bytes()[:19] == b'MATLAB 7.3 MAT-file'
  with h5py.File(path, 'r') as f:
    assert f['images'].shape == (5, 3, W, H) and f['depths'].shape == (5, W, H)
    assert f['images'][0, 0, 0, 0] == 255 and f['depths'][0, 0, 0] == 7.5
    # The bright corner spans 6 columns (W axis, dim 2) and 4 rows (H axis, dim 3).
    assert (f['images'][0, :, :6, :4] == 255).all()
