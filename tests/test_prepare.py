"""`python -m tfds_builders.prepare`: manual-file checks, and no half-built dataset left behind."""

import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hded_jax import defocus
from tests import test_nyu_depth_v2_defocus as nyu_test
from tfds_builders import prepare
from tfds_builders.nyu_depth_v2_defocus import nyu_depth_v2_defocus_dataset_builder as nyu

NAME = 'nyu_depth_v2_defocus'
CONFIG = nyu_test.small_config()
REPO_ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture
def manual_dir(tmp_path):
  path = tmp_path / 'manual'
  path.mkdir()
  nyu_test.write_sources(path)
  return path


def dataset_folders(data_dir) -> list[str]:
  """Everything under data_dir/<name>/<config>/, where TFDS puts versions and temporaries."""
  config_dir = data_dir / NAME / CONFIG.name
  return sorted(p.name for p in config_dir.iterdir()) if config_dir.exists() else []


def is_prepared(data_dir) -> bool:
  return tfds.builder(NAME, config=CONFIG, data_dir=data_dir).is_prepared()


def test_missing_files_fail_before_any_work(tmp_path):
  data_dir = tmp_path / 'data'
  with pytest.raises(FileNotFoundError) as e:
    prepare.prepare(NAME, data_dir=data_dir, manual_dir=tmp_path / 'nowhere')
  message = str(e.value)
  assert f'in the manual folder {tmp_path / "nowhere"}' in message
  assert 'That folder does not exist.' in message
  for name, url in nyu.MANUAL_FILES.items():
    assert f'{name}  <- {url}' in message
  assert not data_dir.exists()


def test_the_command_line_reports_missing_files(tmp_path):
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / nyu.SPLITS_MAT).write_bytes(b'')
  result = subprocess.run(
      [sys.executable, '-m', 'tfds_builders.prepare', 'make3d_defocus',
       f'--manual_dir={tmp_path / "manual"}', f'--data_dir={tmp_path / "data"}'],
      capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)
  assert result.returncode != 0
  assert 'missing Train400Img.tar.gz, Train400Depth.tgz, Test134.tar.gz, Test134Depth.tar.gz' \
      in result.stderr
  assert f"That folder holds: ['{nyu.SPLITS_MAT}']" in result.stderr
  assert not (tmp_path / 'data').exists()


def test_unknown_dataset_and_config_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='choose one of'):
    prepare.prepare('nyu_depth_v2', data_dir=tmp_path)
  with pytest.raises(ValueError, match='focus_3m'):
    prepare.prepare(NAME, data_dir=tmp_path, config='focus_3m')


def test_a_failure_mid_generation_leaves_nothing_that_looks_prepared(
    tmp_path, manual_dir, monkeypatch):
  data_dir = tmp_path / 'data'
  render, calls = defocus.render_defocus, []

  def fail_on_third_frame(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('interrupted')
    return render(*args, **kwargs)

  monkeypatch.setattr(defocus, 'render_defocus', fail_on_third_frame)
  with pytest.raises(RuntimeError, match='interrupted'):
    prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert len(calls) == 3
  assert not is_prepared(data_dir)
  assert dataset_folders(data_dir) == []  # The temporary folder is gone too.

  monkeypatch.setattr(defocus, 'render_defocus', render)
  builder = prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert is_prepared(data_dir) and dataset_folders(data_dir) == ['1.0.0']
  # Array-record files, so the input pipeline gets random access.
  source = builder.as_data_source(split='test')
  assert len(source) == len(nyu_test.TEST)
  np.testing.assert_array_equal(source[1]['aif'], nyu_test.make_frames()[0][source[1]['index']])

  # Once prepared, preparing again renders nothing.
  monkeypatch.setattr(defocus, 'render_defocus', None)
  assert prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir,
                         config=CONFIG).is_prepared()


def test_a_killed_build_leaves_nothing_that_looks_prepared(tmp_path, manual_dir):
  """A process killed mid-build (no clean-up runs) leaves only an `incomplete.*` folder."""
  data_dir = tmp_path / 'data'
  script = textwrap.dedent(f"""
      import os
      from hded_jax import defocus
      from tests import test_nyu_depth_v2_defocus as nyu_test
      from tfds_builders import prepare

      def die(*args, **kwargs):
        os._exit(17)

      defocus.render_defocus = die
      prepare.prepare({NAME!r}, data_dir={str(data_dir)!r}, manual_dir={str(manual_dir)!r},
                      config=nyu_test.small_config())
  """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO_ROOT)
  assert result.returncode == 17, result.stderr
  leftovers = dataset_folders(data_dir)
  assert len(leftovers) == 1 and leftovers[0].startswith('incomplete.'), leftovers
  assert not is_prepared(data_dir)

  prepare.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert is_prepared(data_dir)
