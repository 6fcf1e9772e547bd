"""The code's layering (README.md, "Where things live"): imports run one way, programs are
imported by nothing, and importing a library module changes nothing."""

import ast
import os
import pathlib
import subprocess
import sys

from tests.conftest import REPO

# Each module may import only modules of a lower level. Programs (flags + main) sit on top.
LEVELS = {
    'hded_jax': 0, 'hded_jax.pytorch': 0, 'hded_jax.images': 0, 'hded_jax.defocus': 0,
    'hded_jax.sharding': 0, 'hded_jax.train_state': 0, 'hded_jax.runtime': 1,
    'hded_jax.lowering': 0, 'hded_jax.files': 0, 'hded_jax.progress': 0,
    'hded_jax.command_line': 1,
    'hded_jax.program_cache': 1,
    'hded_jax.models.layers': 0, 'hded_jax.pytorch.reference': 0,
    'hded_jax.models.densenet': 1, 'hded_jax.models.decoder': 1, 'hded_jax.metrics': 1,
    'hded_jax.visualize': 1, 'tfds_builders.common': 2,
    'hded_jax.models.hded_net': 2, 'hded_jax.losses': 2,
    **{f'tfds_builders.{name}{module}': 3 for name in (
        'synthetic_defocus', 'nyu_depth_v2_defocus', 'make3d_defocus')
       for module in ('', f'.{name}_dataset_builder')},
    'hded_jax.models': 3, 'tfds_builders.registry': 4,
    'hded_jax.checkpoints': 4, 'tfds_builders': 5,
    'hded_jax.input_pipeline': 5, 'hded_jax.pytorch.weights': 5,
    'hded_jax.train_lib': 6, 'hded_jax.eval_lib': 6, 'hded_jax.predict_lib': 6,
    'hded_jax.benchmarking': 0, 'hded_jax.benchmarking.measure': 0,
    'hded_jax.benchmarking.traces': 1, 'hded_jax.benchmarking.compile_targets': 2,
    'hded_jax.benchmarking.batches': 6, 'hded_jax.benchmarking.torch_reference': 7,
    'hded_jax.benchmarking.largest_batch': 7,
    'hded_jax.benchmarking.table': 8, 'hded_jax.benchmark_lib': 8,
}
PROGRAMS = {'train', 'eval', 'predict', 'hded_jax.benchmark', 'hded_jax.benchmark_defocus',
            'hded_jax.convert', 'hded_jax.summary', 'tfds_builders.prepare',
            'tfds_builders.preview'}
PACKAGES = ('hded_jax', 'tfds_builders')


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _project_modules() -> dict[str, pathlib.Path]:
  root = pathlib.Path(REPO)
  files = [p for package in PACKAGES for p in (root / package).rglob('*.py')]
  files += [root / f'{name}.py' for name in ('train', 'eval', 'predict')]
  return {_module_name(p): p for p in files}


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The project modules ``path`` imports (``from a import b`` counts as a.b if that is one)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names = [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in known
               else node.module for alias in node.names]
    else:
      continue
    for name in names:
      # The module itself, or the package a name comes from.
      while name and name not in known:
        name = name.rpartition('.')[0]
      if name:
        found.add(name)
  return found


def test_every_module_has_a_level_and_imports_only_below_it():
  modules = _project_modules()
  unplaced = sorted(set(modules) - set(LEVELS) - PROGRAMS)
  assert not unplaced, ('Give these modules a level in LEVELS (or list them as programs): '
                        f'{unplaced}')
  wrong = []
  for name, path in modules.items():
    level = LEVELS.get(name, float('inf'))
    for imported in _imports(path, set(modules)) - {name}:
      if imported in PROGRAMS:
        wrong.append(f'{name} imports the program {imported}')
      elif imported.startswith(f'{name}.') and path.name == '__init__.py':
        continue  # A package re-exports its modules.
      elif LEVELS[imported] >= level:
        wrong.append(f'{name} (level {level}) imports {imported} (level {LEVELS[imported]})')
  assert not wrong, '\n'.join(wrong)


def test_importing_the_library_defines_no_flags_and_leaves_the_environment_alone():
  library = sorted(name for name in _project_modules() if name in LEVELS
                   and name != 'hded_jax.pytorch.reference')  # Needs the torch extra.
  script = f'''
import os, sys
from absl import flags
before = dict(os.environ)
for name in {library!r}:
  __import__(name)
ours = [m for m in flags.FLAGS.flags_by_module_dict() if m.startswith({PACKAGES!r})]
changed = {{k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}}
print(ours, sorted(changed))
'''
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       check=True, env=dict(os.environ, PYTHONPATH=REPO)).stdout
  assert out.split('\n')[-2] == '[] []', out


def test_programs_with_a_config_flag_parse_it_with_one_line_errors():
  """`command_line.parse_flags` (tests/test_runtime.py) for every program that takes --config."""
  modules = _project_modules()
  for program in PROGRAMS:
    source = modules[program].read_text()
    if 'DEFINE_config_file' in source:
      assert 'app.run(main, flags_parser=command_line.parse_flags)' in source, program
