"""The docs name only what exists: each command's flags, config keys, code names and files.

A rename in the code fails here until the docs say the new name."""

import importlib
import json
import pathlib
import re
import subprocess
import sys

import ml_collections
import pytest

from configs import default
from tests.conftest import REPO
from tests.test_layout import PROGRAMS

DOCS = [pathlib.Path(REPO, 'README.md'), *sorted(pathlib.Path(REPO, 'docs').glob('*.md'))]
# `python train.py ...` or `python -m hded_jax.benchmark ...`, to the end of the command
# (lines continued with a backslash included).
COMMAND = re.compile(r'python3? (?:-m ([\w.]+)|(\w+)\.py)((?:[^\n`|;&]|\\\n)*)')
FLAG = re.compile(r'(?<![\w-])--([a-z_][\w.]*)')
# A dotted name in code: `runtime.tune_for_platform`, `config.model.remat`, `model.up_conv`.
DOTTED = re.compile(r'(?<![\w./-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)')
# Paths in the repository: `hded_jax/models/layers.py`, (docs/cameras.md).
PATH = re.compile(r'(?<![\w/.-])((?:hded_jax|tfds_builders|configs|tests|benchmarks|docs)/'
                  r'[\w/.-]*\w)')
FILE_SUFFIXES = ('.py', '.md', '.sh', '.json', '.txt', '.png', '.gz', '.pbtxt', '.mat', '.tar')


def _doc_texts():
  return {doc.relative_to(REPO).as_posix(): doc.read_text() for doc in DOCS}


def _code_spans(text: str) -> list[str]:
  """Inline code spans and fenced code blocks."""
  blocks = re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S)
  inline = re.findall(r'`([^`\n]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
  return [*inline, *blocks]


def _has_key(config: ml_collections.ConfigDict, path: str) -> bool:
  for key in path.split('.'):
    if not isinstance(config, ml_collections.ConfigDict) or key not in config:
      return False
    config = config[key]
  return True


@pytest.fixture(scope='module')
def program_flags() -> dict[str, set[str]]:
  """Each program's flags (absl's own included), from importing it in a child process: the
  programs define the same names, which one process cannot hold at once."""
  script = f"""
import importlib, json, sys
from absl import flags
absl_flags = set(flags.FLAGS)
defined = {{}}
for program in {sorted(PROGRAMS)!r}:
  before = set(flags.FLAGS)
  importlib.import_module(program)
  defined[program] = sorted(set(flags.FLAGS) - before)
  for name in defined[program]:
    delattr(flags.FLAGS, name)
json.dump({{'absl': sorted(absl_flags), **defined}}, sys.stdout)
"""
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                       text=True, check=True)
  flags = json.loads(run.stdout.splitlines()[-1])
  absl_flags = set(flags.pop('absl'))
  return {program: set(names) | absl_flags for program, names in flags.items()}


def test_documented_commands_pass_flags_their_programs_define(program_flags):
  checked, wrong = 0, []
  for doc, text in _doc_texts().items():
    for module, script, args in COMMAND.findall(text):
      program = module or script
      if program not in PROGRAMS:  # pip, pytest, venv: not ours.
        continue
      for flag in FLAG.findall(args):
        checked += 1
        if flag.split('.')[0] not in program_flags[program]:
          wrong.append(f'{doc}: {program} has no --{flag}')
  assert checked > 100, checked
  assert not wrong, '\n'.join(wrong)


def _our_modules() -> dict[str, list[str]]:
  """This repository's modules by their full and their last name: `hded_jax.runtime` and
  `runtime`, `hded_jax.benchmarking` and `benchmarking`."""
  modules = {}
  for package in ('hded_jax', 'tfds_builders'):
    for path in pathlib.Path(REPO, package).rglob('*.py'):
      parts = path.relative_to(REPO).with_suffix('').parts
      full = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
      for name in {full, full.rsplit('.', 1)[-1]}:
        modules.setdefault(name, []).append(full)
  return modules


OUR_MODULES = _our_modules()


def _resolves(name: str) -> bool:
  """Whether ``name`` (its first part one of ``OUR_MODULES``) is a module or an attribute of
  one: `runtime.setup`, `benchmarking.measure.PEAK_BF16_FLOPS`."""
  head, *parts = name.split('.')
  for module in OUR_MODULES[head]:
    rest = list(parts)
    # Submodules are found, not imported: importing two programs would define a flag twice.
    while rest and f'{module}.{rest[0]}' in OUR_MODULES:
      module = f'{module}.{rest.pop(0)}'
    obj = importlib.import_module(module) if rest else None
    for attribute in rest:
      if not hasattr(obj, attribute):
        break
      obj = getattr(obj, attribute)
    else:
      return True
  return False


def test_documented_code_names_and_config_keys_exist():
  """`runtime.setup`, `lowering.kernel_launches`, `config.model.remat`, `dataset.camera`,
  `--config.model.heads=...`: names of this repository's modules and attributes, and config
  keys (every config shares the default's)."""
  config = default.get_config()
  checked, wrong = 0, []
  for doc, text in _doc_texts().items():
    for key in re.findall(r'--config\.([\w.]*\w)', text):
      checked += 1
      if not key.isupper() and not _has_key(config, key):  # FIELD: a placeholder.
        wrong.append(f'{doc}: --config.{key}: no such config key')
    for span in _code_spans(text):
      if re.search(r'[{…]|\w\.\.', span):  # Patterns over names, not names.
        continue
      for name in DOTTED.findall(span):
        if name.endswith(FILE_SUFFIXES) or re.search(rf'{re.escape(name)}[\w/]*\.\w', span):
          continue  # A file name.
        head, *rest = name.split('.')
        if head == 'config':
          head, *rest = rest
        if head in config and isinstance(config[head], ml_collections.ConfigDict):
          checked += 1
          if not _has_key(config, name.removeprefix('config.')):
            wrong.append(f'{doc}: {name}: no such config key')
        elif head in OUR_MODULES:
          checked += 1
          if not _resolves(name):
            wrong.append(f'{doc}: {name}: no such module or attribute')
  assert checked > 200, checked
  assert not wrong, '\n'.join(wrong)


def test_documented_paths_exist():
  checked, wrong = 0, []
  for doc, text in _doc_texts().items():
    for path in PATH.findall(text):
      if re.search(r'[A-Z]{3,}', path):  # A placeholder: tests/fixtures/NAME.
        continue
      checked += 1
      if not pathlib.Path(REPO, path).exists():
        wrong.append(f'{doc}: {path}')
  assert checked > 100, checked
  assert not wrong, '\n'.join(wrong)
