"""The programs' command lines (`command_line`): config-file mistakes and output flags that
cannot be written end in one line, before any work."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

_CONFIG_PROGRAM = """
from absl import app
from ml_collections import config_flags
from hded_jax import command_line
config_flags.DEFINE_config_file('config', None, 'Settings; default: the saved ones.')
app.run(lambda argv: print('main ran'), flags_parser=command_line.parse_flags)
"""


@pytest.mark.parametrize('args, message', [
    (['--config=configs/smoke.py', '--config.modle.dtype=bfloat16'],
     '--config.modle.dtype: the config has no field \'modle\'. Did you mean "model" instead of '
     '"modle"?'),
    (['--config=configs/smoke.py', '--config.model.dtyp=bfloat16'],
     "--config.model.dtyp: the config has no field 'dtyp'."),
    (['--config=configs/smok.py'], '--config=configs/smok.py: no such file (from'),
    (['--config.dataset.data_dir=/data'],
     '--config.dataset.data_dir overrides a field of the --config file, and no --config is '
     'given: pass --config=FILE too.'),
    (['--config=configs/smoke.py', '--config.model.growth_rate=abc'],
     'flag --config.model.growth_rate=abc: invalid literal'),
])
def test_config_flag_mistakes_end_in_one_line(args, message):
  """A misspelled override or a missing config file, as absl reports a bad flag: one line,
  no traceback, before the program starts."""
  run = subprocess.run([sys.executable, '-c', _CONFIG_PROGRAM, *args], cwd=REPO,
                       capture_output=True, text=True)
  assert run.returncode == 1 and 'main ran' not in run.stdout
  assert f'FATAL Flags parsing error: {message}' in run.stderr, run.stderr
  assert 'Traceback' not in run.stderr, run.stderr


def test_a_config_that_loads_reaches_main():
  run = subprocess.run([sys.executable, '-c', _CONFIG_PROGRAM, '--config=configs/smoke.py',
                        '--config.model.dtype=bfloat16'], cwd=REPO, capture_output=True,
                       text=True)
  assert run.returncode == 0 and 'main ran' in run.stdout, run.stderr


@pytest.mark.parametrize('form', ['--config={}', '--config {}'])
def test_a_config_imports_its_sibling_configs_from_any_directory(form, tmp_path):
  """configs/smoke.py imports configs.synthetic, which is found from the repository root only,
  unless the parser puts the folder above the file's package on the path."""
  args = form.format(os.path.join(REPO, 'configs', 'smoke.py')).split()
  run = subprocess.run([sys.executable, '-c', _CONFIG_PROGRAM, *args], cwd=tmp_path,
                       capture_output=True, text=True)
  assert run.returncode == 0 and 'main ran' in run.stdout, run.stderr


@pytest.mark.parametrize('program, flag, other_args', [
    ('predict.py', 'output_dir', ['--checkpoint=/nonexistent', '--input=/nonexistent']),
    ('train.py', 'workdir', ['--config=configs/smoke.py']),
    ('eval.py', 'output_dir', ['--workdir=/nonexistent', '--once']),
])
def test_a_program_stops_on_an_unwritable_output_flag_at_parsing(tmp_path, program, flag,
                                                                 other_args):
  (tmp_path / 'file').write_text('x')
  run = subprocess.run(
      [sys.executable, program, *other_args, f'--{flag}={tmp_path / "file"}'], cwd=REPO,
      capture_output=True, text=True)
  assert run.returncode == 1, run.stderr
  assert (f'FATAL Flags parsing error: flag --{flag}={tmp_path / "file"}: '
          f'{tmp_path / "file"} is a file: give a folder path.') in run.stderr, run.stderr
