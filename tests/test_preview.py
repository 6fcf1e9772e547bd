"""`python -m tfds_builders.preview`: one row of five panels per example, the blur map as
`defocus.signed_blur_sigma_px` of the depth and the example's camera."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hded_jax import defocus
from hded_jax import visualize
from tests.conftest import REPO
from tfds_builders import preview
from tfds_builders import registry

NUM = 3


@pytest.fixture(scope='module')
def builder(tiny_data_dir):
  return registry.builder('synthetic_defocus', data_dir=tiny_data_dir, config='tiny')


def test_preview_writes_a_row_of_five_panels_per_example(builder, tiny_data_dir, tmp_path):
  output = tmp_path / 'grid.png'
  subprocess.run([sys.executable, '-m', 'tfds_builders.preview', 'synthetic_defocus',
                  '--config=tiny', '--split=test', f'--num={NUM}',
                  f'--data_dir={tiny_data_dir}', f'--output={output}'],
                 cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=REPO))
  grid = np.asarray(Image.open(output).convert('RGB'))
  rows = preview.preview_rows(builder, 'test', NUM)
  expected, tops = visualize.stack_rows(rows)
  np.testing.assert_array_equal(grid, expected)
  assert len(tops) == NUM and all(row.boxes.keys() == set(visualize.PANELS) for row in rows)
  assert list(rows[0].boxes) == list(visualize.PANELS)

  # The blur panel shows the signed sigma of each pixel's depth, read from the PNG at sampled
  # pixels of each example (panels enlarge the 32x32 examples 4x).
  source = builder.as_data_source(split='test')
  rng = np.random.default_rng(0)
  blur, depth_panel = visualize.PANELS[3], visualize.PANELS[2]
  for i, (row, top) in enumerate(zip(rows, tops)):
    example = source[i]
    camera = defocus.Camera(**{k: float(v) for k, v in example['camera'].items()})
    ys, xs = rng.integers(0, 32, 20), rng.integers(0, 32, 20)
    depth = example['depth'][ys, xs]
    for name, values in ((blur, defocus.signed_blur_sigma_px(depth, camera)),
                         (depth_panel, depth)):
      panel_top, left, height, width = row.boxes[name]
      zoom = height // 32
      assert zoom == 4 and width == 32 * zoom
      shown = grid[top + panel_top + ys * zoom + zoom // 2, left + xs * zoom + zoom // 2]
      np.testing.assert_array_equal(shown, row.scales[name].colours(values))
    assert row.scales[blur].vmin == -row.scales[blur].vmax  # Symmetric: 0 = in focus.
  assert visualize.camera_caption(camera.as_dict()) == (
      'f = 15 mm, f/2.8, pixel 5.6 um, focus 2 m')


def test_preview_renders_other_cameras_as_training_does(builder):
  """With the dataset's own camera the rendered input is the stored one (up to its uint8
  rounding); refocused at 0.6 m it is another image."""
  stored = preview.preview_rows(builder, 'test', 1)[0]
  own = preview.preview_rows(builder, 'test', 1, camera={'focus_distance': 2.0})[0]
  near = preview.preview_rows(builder, 'test', 1, camera={'focus_distance': 0.6})[0]
  top, left, h, w = stored.boxes[visualize.PANELS[0]]
  crop = lambda row: row.image[top:top + h, left:left + w].astype(np.float32)
  assert np.abs(crop(own) - crop(stored)).max() <= 1
  assert np.abs(crop(near) - crop(stored)).mean() > 5


def test_preview_of_an_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tfds_builders.preview', 'nyu_depth_v2_defocus',
       f'--data_dir={tmp_path}', f'--output={tmp_path / "grid.png"}'],
      cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert result.returncode != 0
  assert 'python -m tfds_builders.prepare nyu_depth_v2_defocus' in result.stderr
  assert not (tmp_path / 'grid.png').exists()


def test_preview_output_must_be_a_png_it_can_write(tmp_path):
  for output, says in ((tmp_path / 'grid.jpg', 'the preview is a PNG: give a path ending in .png'),
                       (tmp_path, 'is a folder: give a file path')):
    result = subprocess.run(
        [sys.executable, '-m', 'tfds_builders.preview', 'synthetic_defocus', '--config=tiny',
         f'--data_dir={tmp_path}', f'--output={output}'],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 1, result.stderr
    assert f'FATAL Flags parsing error: flag --output={output}: ' in result.stderr
    assert says in result.stderr, result.stderr
