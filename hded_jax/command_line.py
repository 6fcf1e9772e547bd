"""How the programs read their command lines: absl's flags, where a mistake in a --config file
or its overrides, or an output flag that cannot be written, ends the program with one line
before any work, as absl ends it for a bad flag value."""

import os
import sys

from absl import flags

from hded_jax import files


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for ``app.run(main, flags_parser=command_line.parse_flags)``: a --config
  file that does not exist, a misspelled ``--config.KEY`` and an override given without the
  --config it overrides end the program with one line, as absl ends it for a bad flag value,
  instead of ml_collections' traceback or a run that starts on a config that never loaded."""
  _let_config_import_its_package(argv)
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:
      config.keys()  # A file that failed to load raises here, not when main reads it.
    return remaining
  except flags.Error as error:
    if (isinstance(error, flags.UnrecognizedFlagError) and error.flagname.startswith('config.')
        and 'config' in flags.FLAGS):
      _flags_error(f'--{error.flagname} overrides a field of the --config file, and no --config '
                   'is given: pass --config=FILE too.')
    _flags_error(str(error))
  except (KeyError, AttributeError) as error:
    while error.args and isinstance(error.args[0], BaseException):
      error = error.args[0]  # ml_collections wraps its KeyError in an AttributeError.
    if not isinstance(error, KeyError):
      raise
    key, _, hint = str(error.args[0]).partition('\n')
    given = [arg.split('=')[0] for arg in argv if arg.startswith('--config.')
             and key.strip("'") in arg.split('=')[0].split('.')]
    _flags_error(f'{" ".join(given) or "--config"}: the config has no field {key}. {hint}')
  except OSError as error:
    if 'No such file or directory' not in str(error):
      raise  # A config file that fails in its own code: its traceback says where.
    _flags_error(f'--config={flags.FLAGS["config"].config_filename}: no such file (from '
                 f'{os.getcwd()}; the configs are in the repository\'s configs/).')


def _let_config_import_its_package(argv: list[str]) -> None:
  """Puts the folder above a --config file's package (the repository root for configs/) first
  on ``sys.path``, so that the file's ``from configs import default`` works from any working
  directory, not only from the root, where ``python train.py`` and ``python -m`` start."""
  paths = [arg.partition('=')[2] for arg in argv if arg.startswith('--config=')]
  paths += [after for arg, after in zip(argv, argv[1:]) if arg == '--config']
  for path in paths:
    root = os.path.dirname(os.path.abspath(path))
    while os.path.exists(os.path.join(root, '__init__.py')):
      root = os.path.dirname(root)
    if os.path.abspath(sys.path[0] or os.curdir) != root:
      sys.path.insert(0, root)


def _flags_error(message: str) -> None:
  """Exits as absl does for a flag it cannot parse."""
  sys.stderr.write(f'FATAL Flags parsing error: {message}\n'
                   'Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


def validate_output_flag(name: str, *, folder: bool = False) -> None:
  """Has absl's flag parsing stop on an output flag ``--name`` that cannot be written
  (`files.unwritable`), so that a program ends before its work, not after it."""

  def check(path: str | None) -> bool:
    if path and (reason := files.unwritable(path, folder=folder)):
      raise flags.ValidationError(reason)  # absl names the flag and its value.
    return True

  flags.register_validator(name, check)
