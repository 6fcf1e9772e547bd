"""The NYU Depth v2 defocus builder on a tiny labeled .mat written in MATLAB's v7.3 layout."""

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hded_jax import defocus
from tests.fixtures import defocus_sources
from tests.fixtures.defocus_sources import NYU_BANDS as BANDS
from tests.fixtures.defocus_sources import NYU_H as H
from tests.fixtures.defocus_sources import NYU_TEST as TEST
from tests.fixtures.defocus_sources import NYU_TRAIN as TRAIN
from tests.fixtures.defocus_sources import NYU_W as W
from tfds_builders.nyu_depth_v2_defocus import nyu_depth_v2_defocus_dataset_builder as nyu


def build(config, manual_dir, data_dir, num_workers=1) -> tfds.core.DatasetBuilder:
  builder = nyu.Builder(config=config, data_dir=data_dir, num_workers=num_workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


class NyuDepthV2DefocusTest(defocus_sources.ManualSourcesTestCase):
  DATASET_CLASS = nyu.Builder
  BUILDER_CONFIG_NAMES_TO_TEST = [defocus_sources.nyu_config()]
  SPLITS = {'train': len(TRAIN), 'test': len(TEST)}
  write_sources = staticmethod(defocus_sources.write_nyu_sources)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """Builds the dataset once at focus 2 m; returns (builder, images, depths)."""
  root = tmp_path_factory.mktemp('nyu')
  manual_dir = root / 'manual'
  manual_dir.mkdir()
  images, depths = defocus_sources.write_nyu_sources(manual_dir)
  return build(defocus_sources.nyu_config(), manual_dir, root / 'data'), images, depths


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
  defocus_sources.write_nyu_sources(manual_dir)
  builder = build(defocus_sources.nyu_config(focus_distance=10.0), manual_dir, tmp_path / 'data')
  ex = examples(builder, 'train')[0]
  assert ex['camera']['focus_distance'] == 10.0
  blur = band_blur(ex['image'], ex['aif'])
  assert blur[4] < 2 < blur[3] < blur[2] < blur[1] < blur[0]


def test_missing_files_are_named_with_their_urls_and_the_folder(tmp_path):
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  defocus_sources.write_nyu_splits_mat(manual_dir / nyu.SPLITS_MAT, TRAIN, TEST)
  with pytest.raises(FileNotFoundError) as e:
    build(defocus_sources.nyu_config(), manual_dir, tmp_path / 'data')
  message = str(e.value)
  assert f'missing {nyu.LABELED_MAT} in the manual folder {manual_dir}' in message
  for url in nyu.MANUAL_FILES.values():
    assert url in message


def test_a_non_hdf5_labeled_file_is_rejected(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  (tmp_path / nyu.LABELED_MAT).write_bytes(b'MATLAB 5.0 MAT-file' + bytes(200))
  with pytest.raises(ValueError, match='not a MATLAB v7.3'):
    build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')


def test_frames_of_another_size_are_rejected(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  with pytest.raises(ValueError, match=r'\(N, 3, 640, 480\)'):
    build(nyu.Builder.BUILDER_CONFIGS[0], tmp_path, tmp_path / 'data')


def test_split_indices_beyond_the_file_are_rejected(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  defocus_sources.write_nyu_splits_mat(tmp_path / nyu.SPLITS_MAT, [1, 2], [6])
  with pytest.raises(ValueError, match=r'outside 1\.\.5'):
    build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')


def test_real_file_layout_is_images_n_3_w_h(tmp_path):
  """The fixture really is MATLAB's layout: reversed axes on disk, v7.3 header."""
  defocus_sources.write_nyu_sources(tmp_path)
  path = tmp_path / nyu.LABELED_MAT
  assert path.read_bytes()[:19] == b'MATLAB 7.3 MAT-file'
  with h5py.File(path, 'r') as f:
    assert f['images'].shape == (5, 3, W, H) and f['depths'].shape == (5, W, H)
    assert f['images'][0, 0, 0, 0] == 255 and f['depths'][0, 0, 0] == 7.5
    # The bright corner spans 6 columns (W axis, dim 2) and 4 rows (H axis, dim 3).
    assert (f['images'][0, :, :6, :4] == 255).all()


def test_configs_store_d3net_by_default_and_clean_on_request(built, tmp_path):
  names = {c.name: c.defocus_mode for c in nyu.Builder.BUILDER_CONFIGS}
  assert names == {'focus_2m': 'd3net', 'focus_4m': 'd3net', 'focus_8m': 'd3net',
                   'focus_2m_clean': 'clean', 'focus_4m_clean': 'clean',
                   'focus_8m_clean': 'clean'}
  assert nyu.Builder.DEFAULT_BUILDER_CONFIG_NAME == 'focus_2m'
  camera = defocus.camera_preset('nyu', focus_distance=2.0)
  builder, images, depths = built
  for ex in examples(builder, 'train'):
    i = ex['index']
    np.testing.assert_array_equal(ex['image'], defocus.render_defocus(
        images[i], depths[i], camera, mode='d3net', sigma_tolerance=0))
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  defocus_sources.write_nyu_sources(manual_dir)
  clean = build(defocus_sources.nyu_config(mode='clean'), manual_dir, tmp_path / 'data')
  ex = examples(clean, 'test')[0]
  i = ex['index']
  np.testing.assert_array_equal(ex['image'], defocus.render_defocus(
      images[i], depths[i], camera, mode='clean', sigma_tolerance=0))
  assert not np.array_equal(ex['image'], examples(builder, 'test')[0]['image'])


def test_two_workers_write_the_same_files_as_one(built, tmp_path):
  builder, _, _ = built
  manual_dir = tmp_path / 'manual'
  manual_dir.mkdir()
  defocus_sources.write_nyu_sources(manual_dir)
  parallel = build(defocus_sources.nyu_config(), manual_dir, tmp_path / 'data', num_workers=2)
  records = lambda b: {p.name: p.read_bytes() for p in b.data_path.glob(f'{b.name}-*')}
  sequential_records = records(builder)
  assert len(sequential_records) == 2 and records(parallel) == sequential_records


def test_a_text_splits_mat_is_named_with_the_fix(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  # What MATLAB's `save -ascii` writes.
  (tmp_path / nyu.SPLITS_MAT).write_text('   1.0000000e+00\n   3.0000000e+00\n')
  with pytest.raises(ValueError, match=f'{tmp_path / nyu.SPLITS_MAT} is not a MATLAB .mat file'
                     r'.*download splits\.mat again from http'):
    build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')


def test_a_v73_splits_mat_is_read(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  defocus_sources.write_nyu_splits_mat73(tmp_path / nyu.SPLITS_MAT, TRAIN, TEST)
  builder = build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')
  assert [ex['index'] for ex in examples(builder, 'test')] == [i - 1 for i in TEST]


def test_a_truncated_labeled_mat_is_named_with_the_fix(tmp_path):
  defocus_sources.write_nyu_sources(tmp_path)
  path = tmp_path / nyu.LABELED_MAT
  path.write_bytes(path.read_bytes()[:-2000])
  with pytest.raises(ValueError, match=f'{path} cannot be read .*truncated or damaged. '
                     'Download it again from http'):
    build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')


def test_an_empty_split_fails_before_any_rendering(tmp_path, monkeypatch):
  defocus_sources.write_nyu_sources(tmp_path)
  defocus_sources.write_nyu_splits_mat(tmp_path / nyu.SPLITS_MAT, TRAIN, [])
  monkeypatch.setattr(defocus, 'render_defocus', None)  # Any rendering would fail otherwise.
  with pytest.raises(ValueError, match=f'{tmp_path / nyu.SPLITS_MAT}: testNdxs is empty'):
    build(defocus_sources.nyu_config(), tmp_path, tmp_path / 'data')
