"""Files written whole or not at all (`hded_jax.files`)."""

import os
import stat

import numpy as np
import pytest

from hded_jax import files


def test_a_write_stopped_midway_leaves_the_previous_file_and_nothing_else(tmp_path):
  path = tmp_path / 'new_folder' / 'results.json'
  with files.atomic_write(str(path)) as f:
    f.write('{"step": 1}')
  assert path.read_text() == '{"step": 1}'
  with pytest.raises(KeyboardInterrupt):
    with files.atomic_write(str(path)) as f:
      f.write('{"step": ')
      raise KeyboardInterrupt  # As a time limit's signal would stop it.
  assert path.read_text() == '{"step": 1}'
  assert os.listdir(path.parent) == ['results.json']


def test_binary_files_and_permissions_as_open_gives_them(tmp_path):
  umask = os.umask(0o022)
  try:
    with files.atomic_write(str(tmp_path / 'depth.npy'), 'wb') as f:
      np.save(f, np.arange(3.0))
  finally:
    os.umask(umask)
  np.testing.assert_array_equal(np.load(tmp_path / 'depth.npy'), np.arange(3.0))
  # Readable by others, as a file open() made: not a temporary file's 0600.
  assert stat.S_IMODE(os.stat(tmp_path / 'depth.npy').st_mode) == 0o644


def test_outputs_that_cannot_be_written_are_named_before_any_work(tmp_path, monkeypatch):
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'file').write_text('x')
  assert files.unwritable(str(tmp_path / 'new' / 'deeper' / 'results.json')) is None
  assert files.unwritable(str(tmp_path / 'new' / 'out'), folder=True) is None
  assert files.unwritable(str(tmp_path / 'folder'), folder=True) is None
  assert 'is a folder: give a file path' in files.unwritable(str(tmp_path / 'folder'))
  assert 'is a file: give a folder path' in files.unwritable(str(tmp_path / 'file'), folder=True)
  assert 'is a file, so' in files.unwritable(str(tmp_path / 'file' / 'out.json'))
  assert 'is a URL: hded-jax reads and writes local paths only' in files.unwritable(
      'gs://bucket/run', folder=True)
  monkeypatch.setenv('HOME', str(tmp_path))  # ~ is the home folder, not a folder named '~'.
  assert 'is a file: give a folder path' in files.unwritable('~/file', folder=True)
  # A read-only file system (as root, permission bits do not stop a write; the kernel says so).
  monkeypatch.setattr(os, 'access', lambda path, mode: path != str(tmp_path))
  assert 'is not writable' in files.unwritable(str(tmp_path / 'out'), folder=True)
