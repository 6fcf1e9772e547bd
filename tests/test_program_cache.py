"""The program cache: compiled programs kept under a key known before tracing."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from hded_jax import program_cache
from hded_jax import sharding
from hded_jax.train_state import TrainState
from tests.conftest import REPO


def _step(state, batch):
  return state.replace(step=state.step + 1), {'sum': jnp.sum(batch['x']) * state.params['w'].sum()}


def _args(width=3):
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'model': 1}))
  placed = sharding.replicated(mesh)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=nnx.State({'w': jnp.ones(width)}),
                     batch_stats=nnx.State({}), opt_state=())
  state = jax.device_put(state, placed)
  batch = {'x': jax.device_put(np.arange(8, dtype=np.float32).reshape(8, 1),
                               sharding.batch_sharding(mesh))}
  return state, batch


@pytest.fixture
def fresh_code_digest():
  program_cache._code.cache_clear()
  yield
  program_cache._code.cache_clear()


def test_a_kept_program_loads_and_computes_as_compiled(own_program_cache):
  args = _args()
  cached = program_cache.cached_program('step', args, lr=1.0)
  assert cached.path.startswith(own_program_cache) and not cached.exists()
  compiled = jax.jit(_step, donate_argnums=0).lower(*args).compile()
  cached.save(compiled)
  assert os.listdir(own_program_cache) == [os.path.basename(cached.path)]  # No temporary left.
  again = program_cache.cached_program('step', _args(), lr=1.0)
  assert again.path == cached.path
  loaded = again.load()
  state, out = loaded(*(args := _args()))
  assert int(state.step) == 1 and float(out['sum']) == 28 * 3
  assert args[0].step.is_deleted()  # Donated, as compiled.


def test_the_key_follows_settings_arguments_environment_and_jax_settings(own_program_cache,
                                                                       monkeypatch):
  path = program_cache.cached_program('step', _args(), lr=1.0).path
  others = [program_cache.cached_program('step', _args(), lr=0.5).path,
            program_cache.cached_program('other', _args(), lr=1.0).path,
            program_cache.cached_program('step', _args(width=4), lr=1.0).path]
  monkeypatch.setenv('XLA_FLAGS', os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_use_thunk_runtime=true')
  others.append(program_cache.cached_program('step', _args(), lr=1.0).path)
  monkeypatch.undo()
  with jax.default_matmul_precision('highest'):
    others.append(program_cache.cached_program('step', _args(), lr=1.0).path)
  assert program_cache.cached_program('step', _args(), lr=1.0).path == path
  assert len({path, *others}) == 1 + len(others)


def test_the_key_covers_the_package_sources_and_the_libraries_files(fresh_code_digest, tmp_path,
                                                                     monkeypatch):
  package = tmp_path / 'package'
  (package / 'models').mkdir(parents=True)
  (package / 'models' / 'layers.py').write_text('A = 1\n')
  library = tmp_path / 'site' / 'fakelib'
  (library / '_src').mkdir(parents=True)
  (library / '__init__.py').write_text('')
  (library / '_src' / 'core.py').write_text('B = 1\n')
  monkeypatch.setattr(program_cache, '_PACKAGE_DIR', package)
  monkeypatch.setattr(program_cache, '_PROGRAM_LIBRARIES', ('fakelib', 'not_installed'))
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))

  def digest():
    program_cache._code.cache_clear()
    return program_cache._code()

  digests = [digest()]
  (package / 'models' / 'layers.py').write_text('A = 2\n')  # This package: by content.
  digests.append(digest())
  (library / '_src' / 'core.py').write_text('B = 22\n')  # A library: by size...
  digests.append(digest())
  os.utime(library / '_src' / 'core.py', ns=(0, 10**18))  # ... and modification time.
  digests.append(digest())
  assert digest() == digests[-1] and len(set(digests)) == 4


def test_nothing_is_cached_without_a_compilation_cache_or_over_several_processes(
    own_program_cache, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert program_cache.cached_program('step', _args()) is None
  monkeypatch.undo()
  jax.config.update('jax_compilation_cache_dir', None)
  assert program_cache.cached_program('step', _args()) is None


def test_a_damaged_or_foreign_program_is_removed_and_compiled_again(own_program_cache, caplog):
  args = _args()
  cached = program_cache.cached_program('step', args)
  cached.save(jax.jit(_step).lower(*args).compile())
  # Another argument structure under the same name (a hand-copied file): not loaded.
  assert program_cache.CachedProgram(cached.path, ({'x': args[1]['x']},)).load() is None
  assert not cached.exists()
  os.makedirs(own_program_cache, exist_ok=True)
  with open(cached.path, 'wb') as f:
    f.write(b'\x80\x04 not a program')
  assert cached.load() is None and not cached.exists()
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 2 and all('Compiling the program again' in w for w in warnings)


def test_a_cache_that_cannot_be_written_leaves_nothing_and_stops_nothing(own_program_cache,
                                                                          monkeypatch, caplog):
  args = _args()
  cached = program_cache.cached_program('step', args)
  os.makedirs(own_program_cache)

  def disk_full(*unused):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(program_cache.os, 'replace', disk_full)
  cached.save(jax.jit(_step).lower(*args).compile())
  assert not os.listdir(own_program_cache)
  assert 'not cached' in caplog.text and 'No space left' in caplog.text


def test_only_the_newest_programs_are_kept(own_program_cache, monkeypatch):
  monkeypatch.setattr(program_cache, 'MAX_PROGRAMS', 2)
  for lr in (1.0, 2.0, 3.0):
    args = _args()
    program_cache.cached_program('step', args, lr=lr).save(jax.jit(_step).lower(*args).compile())
  kept = sorted(os.listdir(own_program_cache))
  assert len(kept) == 2 and os.path.basename(
      program_cache.cached_program('step', _args(), lr=1.0).path) not in kept


def test_only_what_xla_compiled_is_kept_not_what_jax_read_from_its_cache(own_program_cache):
  """An executable that JAX read from its compilation cache does not serialise whole on XLA's
  CPU backend: its loaded copy fails at its first run."""
  def program(x):
    return jnp.cos(x) * 7.25 + jnp.arange(5.0)  # Compiled by no other test.

  x = np.ones(5, np.float32)
  first = program_cache.CachedProgram(os.path.join(own_program_cache, 'a.program'), (x,))
  program_cache.compile_and_keep(jax.jit(program).lower(x), first)
  jax.clear_caches()  # The next compile finds it in JAX's compilation cache.
  second = program_cache.CachedProgram(os.path.join(own_program_cache, 'b.program'), (x,))
  compiled = program_cache.compile_and_keep(jax.jit(program).lower(x), second)
  assert first.exists() and not second.exists()
  np.testing.assert_allclose(first.load()(x), compiled(x))


# Loads the program at argv[1] in a new process and prints what it computes.
_LOAD = '''
import sys
from hded_jax import program_cache
from tests.test_program_cache import _args
state, out = program_cache.CachedProgram(sys.argv[1], _args()).load()(*_args())
print(int(state.step), float(out['sum']))
'''


def test_another_process_loads_the_program(own_program_cache):
  args = _args()
  cached = program_cache.cached_program('step', args)
  cached.save(jax.jit(_step).lower(*args).compile())
  out = subprocess.run([sys.executable, '-c', _LOAD, cached.path], cwd=REPO, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO)).stdout
  assert out.split() == ['1', str(28.0 * 3)]
