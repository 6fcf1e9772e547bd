"""Process set-up: CPU settings only on the CPU, the allocator and dispatch settings, XLA's CPU
convolutions, the compilation cache and XLA's autotune cache, local paths."""

import functools
import logging
import os
import platform
import shutil
import subprocess
import sys
import types

import jaxlib.version
from jaxlib import xla_client
import pytest

from hded_jax import checkpoints
from hded_jax import eval_lib
from hded_jax import predict_lib
from hded_jax import runtime
from hded_jax import train_lib
from hded_jax.pytorch import weights
from tests.conftest import tiny_config
from tests.train_worker import finish
from tests.train_worker import launch
from tests.train_worker import REPO

# Allocates, writes and frees 256 MiB twice with malloc (as XLA does with its temporaries; numpy
# would ask for huge pages) and prints the page faults each round took.
_ALLOCATE_TWICE = '''
import ctypes, ctypes.util, resource, sys
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == 'keep':
  from hded_jax import runtime
  assert runtime.keep_freed_memory()
faults = []
for _ in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(256 << 20)
  ctypes.memset(block, 1, 256 << 20)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
'''


def _child_stdout(script: str, *args: str, env: dict[str, str] | None = None) -> str:
  """What ``script`` prints, run by a fresh Python in the repository with ``env`` (default:
  this process's environment); PYTHONPATH is the repository unless ``env`` sets it."""
  env = dict(os.environ if env is None else env)
  env.setdefault('PYTHONPATH', REPO)
  return subprocess.run([sys.executable, '-c', script, *args], cwd=REPO, check=True,
                        capture_output=True, text=True, env=env).stdout


def _env_without_xla_flags(**overrides: str) -> dict[str, str]:
  """This process's environment less XLA_FLAGS (XLA then starts from its defaults), with
  ``overrides``."""
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'} | overrides


def _faults(mode):
  return [int(v) for v in _child_stdout(_ALLOCATE_TWICE, mode).split()]


@pytest.mark.environment
def test_freed_memory_is_reused_without_page_faults():
  # 256 MiB is 65536 pages of 4 KiB. glibc's default unmaps the block on free, so the second
  # allocation faults every page in again (unless the kernel backs it with huge pages).
  _, second = _faults('default')
  if not _huge_pages_always():
    assert second > 50_000
  _, second = _faults('keep')
  assert second < 5_000


# Mallocs a small block in a new thread and tells whether it came from the main arena (below the
# program break) or from an arena of the thread's own (mapped far above it).
_THREAD_ARENA = """
import ctypes, ctypes.util, threading
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
from hded_jax import runtime
assert runtime.keep_freed_memory()
blocks = []
thread = threading.Thread(target=lambda: blocks.append(libc.malloc(1024)))
thread.start()
thread.join()
print('own' if blocks[0] > libc.sbrk(0) else 'main')
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc arenas')
def test_threads_keep_arenas_of_their_own():
  # One arena for all threads serialised XLA's compiler threads on its lock.
  assert _child_stdout(_THREAD_ARENA).split() == ['own']


# Runs a program with a 128 MiB temporary eight times after the allocator and dispatch settings,
# and prints whether programs ran on the calling thread and the fewest page faults of the last
# four runs.
_TEMPORARY_FAULTS = """
import resource
from hded_jax import runtime
assert runtime.keep_freed_memory()
inline = runtime.run_programs_on_the_calling_thread()
import jax, jax.numpy as jnp
program = jax.jit(lambda x, w: jnp.sum((x @ w) * jnp.cos(x)))
x, w = jnp.ones((16384, 2048)), jnp.ones((2048, 2048))
faults = []
for _ in range(8):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(inline, min(faults[4:]))
"""


def _temporary_faults(**env):
  inline, faults = _child_stdout(_TEMPORARY_FAULTS, env=_env_without_xla_flags(**env)).split()
  return inline == 'True', int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc arenas')
def test_programs_on_the_calling_thread_reuse_their_temporaries():
  # A worker thread's arena maps blocks over 64 MiB afresh: 32-37 K faults on every run for
  # these 128 MiB (32 K pages). The main arena grows for the first one to four runs (32 K
  # faults each, other blocks sit where the temporary was) and then keeps it: 0, or 4 K for
  # another block. Seen on the 2-core VM over 10 processes: runs 5-8 at most 4,227 inline, at
  # least 32,769 dispatched; runs 3-4 of one process both 32,768 in 2 of 6 (and once in CI).
  # Once, in the whole suite on two workers (jaxlib 0.11.2), runs 5-8 of one process all
  # 32,800, and 0-128 in each of 8 processes after: a second process settles such a run.
  inline, faults = _temporary_faults()
  if inline and faults >= 16_000:
    inline, faults = _temporary_faults()
  assert inline and faults < 16_000
  # The user's own choice stands.
  assert _temporary_faults(JAX_CPU_ENABLE_ASYNC_DISPATCH='1')[0] is False


def _huge_pages_always():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[always]' in f.read()
  except OSError:
    return False


# Imports train.py and the libraries behind every entry point (none may start the backend on
# import), applies the set-up a process that trains gets, then tells whether XLA wrapped a lone
# convolution in a YNNPACK fusion.
_CONVOLUTION_LIBRARY = '''
import sys
import train
from hded_jax import eval_lib, predict_lib, runtime
if sys.argv[1] == 'tuned':
  runtime.tune_for_platform(training=True)
import jax, jax.numpy as jnp
conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(
    x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
text = conv.lower(jnp.ones((1, 32, 32, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print('ynnpack' if '__ynn_fusion' in text else 'eigen')
'''


def _convolution_library(mode):
  return _child_stdout(_CONVOLUTION_LIBRARY, mode, env=_env_without_xla_flags()).split()[-1]


@pytest.mark.environment
@pytest.mark.skipif(
    jaxlib.version.__version_info__[:2] not in runtime._EIGEN_CONVOLUTIONS_JAXLIBS,
    reason='the flag is only set on the jaxlib versions it was measured on')
def test_the_flag_gets_eigen_convolutions():
  assert _convolution_library('default') == 'ynnpack'  # XLA's default, which the flag changes.
  assert _convolution_library('tuned') == 'eigen'


# Runs an entry point's main (argv[1]: train, eval or predict; argv[2]: a workdir) up to the
# library call it makes after its set-up, stubbed out, with the Eigen flag taken as measured on
# this jaxlib, and tells whether the flag is in XLA_FLAGS then.
_ENTRY_POINT = '''
import importlib, os, sys, types
from absl import flags
import jaxlib.version
from hded_jax import eval_lib, predict_lib, runtime, train_lib
entry, workdir = sys.argv[1:]
script = importlib.import_module(entry)
runtime._EIGEN_CONVOLUTIONS_JAXLIBS = (jaxlib.version.__version_info__[:2],)
train_lib.train = eval_lib.evaluate = lambda *args, **kwargs: None
predict_lib.run = lambda *args, **kwargs: types.SimpleNamespace(written=[1], skipped=[])
eval_lib.run_dir = lambda path, once, output_dir: path
arguments = (['--checkpoint', '--input', '--output_dir'] if entry == 'predict' else
             ['--config=configs/smoke.py', '--workdir'])
flags.FLAGS([entry] + [a if '=' in a else f'{a}={workdir}' for a in arguments])
script.main([entry])
print(runtime._EIGEN_CONVOLUTIONS_FLAG in os.environ.get('XLA_FLAGS', '').split())
'''


@pytest.mark.parametrize('entry, eigen', [('train', True), ('eval', False), ('predict', False)])
def test_only_training_gets_eigen_convolutions(entry, eigen, tmp_path):
  # The forward alone is faster on XLA's default (runtime.use_eigen_convolutions).
  assert _child_stdout(_ENTRY_POINT, entry, str(tmp_path), env=_env_without_xla_flags(
      JAX_PLATFORMS='cpu')).split()[-1] == str(eigen)


# Tells where runtime thinks the computation runs (for JAX_PLATFORMS, then for each jax_platforms
# value given) and whose settings it applied, and checks that deciding started no backend and
# loaded no plugin (a fake plugin's initialize() would raise).
_TUNE = '''
import os, sys
import jax
from hded_jax import runtime
from jax._src import xla_bridge
platform, applied = runtime.computation_platform(), runtime.tune_for_platform(training=True)
flags = os.environ.get('XLA_FLAGS', '')
for value in sys.argv[1:]:
  jax.config.update('jax_platforms', value)
  platform += ' ' + runtime.computation_platform()
assert not xla_bridge.backends_are_initialized()
print(applied, platform, '|', flags)
'''

_FAKE_PLUGIN = '''
def initialize():
  raise AssertionError('plugin loaded')
'''


def _tune(tmp_path, jax_platforms, *other_values, plugin=None):
  """(the platform tuned for or 'None', platforms, XLA_FLAGS) from a fresh process; ``plugin``
  installs a fake PJRT plugin module of that name under the ``jax_plugins`` namespace package."""
  path = [REPO]
  if plugin:
    os.makedirs(tmp_path / 'site' / 'jax_plugins' / plugin)
    (tmp_path / 'site' / 'jax_plugins' / plugin / '__init__.py').write_text(_FAKE_PLUGIN)
    path.append(str(tmp_path / 'site'))
  env = _env_without_xla_flags(JAX_PLATFORMS=jax_platforms, PYTHONPATH=os.pathsep.join(path))
  settings, flags = _child_stdout(_TUNE, *other_values, env=env).strip().split('|')
  applied, *platforms = settings.split()
  return applied, platforms, flags.split()


def test_platform_settings_apply_only_where_they_were_measured(tmp_path):
  applied, platforms, flags = _tune(tmp_path, 'cpu')
  assert applied == 'cpu' and platforms == ['cpu']
  if jaxlib.version.__version_info__[:2] in runtime._EIGEN_CONVOLUTIONS_JAXLIBS:
    assert flags == [runtime._EIGEN_CONVOLUTIONS_FLAG]
  # As on a GPU or TPU VM: the CPU only drives the accelerator; GPU settings on a GPU only.
  assert _tune(tmp_path, 'cuda', 'tpu,cpu', 'rocm', 'cpu,cuda') == (
      'gpu', ['gpu', 'tpu', 'gpu', 'cpu'], [runtime._CUBLAS_GEMMS_FLAG])
  assert _tune(tmp_path, 'tpu') == ('None', ['tpu'], [])
  # No JAX_PLATFORMS: an installed PJRT plugin is what JAX computes on.
  applied, platforms, flags = _tune(tmp_path, '', plugin='fake_accelerator')
  assert platforms[0] in ('fake_accelerator', 'gpu', 'tpu')  # A real accelerator comes first.
  assert applied == ('gpu' if platforms[0] == 'gpu' else 'None')
  assert not flags or platforms[0] == 'gpu'


@pytest.mark.parametrize('platform, variables, detected, outcome', [
    ('tpu', {}, True, 'initialised'),  # A Cloud TPU slice: JAX reads its hosts from metadata.
    ('tpu', {}, False, 'one process'),  # A TPU host outside Google Cloud.
    ('cpu', {}, True, 'not asked'),
    ('gpu', {'SLURM_NTASKS': '2'}, True, 'initialised'),
    ('gpu', {'SLURM_NTASKS': '2'}, False, 'error'),  # A cluster that fails to connect.
])
def test_tpu_hosts_and_clusters_start_jax_distributed(platform, variables, detected, outcome,
                                                      monkeypatch, caplog):
  """Orbax's checkpoints need jax.distributed on every multi-process run, and a TPU slice's
  hosts have no variable that says they are several."""
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES',
               'MEGASCALE_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    monkeypatch.delenv(name, raising=False)
  for name, value in variables.items():
    monkeypatch.setenv(name, value)
  calls = []

  def initialize(**kwargs):
    calls.append(kwargs)
    if not detected:
      raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(runtime, 'computation_platform', lambda: platform)
  monkeypatch.setattr(runtime, 'tune_for_platform', lambda training: None)
  monkeypatch.setattr(runtime, 'enable_compilation_cache', lambda cache_dir: None)
  monkeypatch.setattr(runtime.jax.distributed, 'initialize', initialize)
  with caplog.at_level(logging.WARNING):
    if outcome == 'error':
      with pytest.raises(ValueError, match='coordinator_address'):
        runtime.setup('/tmp/unused', training=True)
    else:
      runtime.setup('/tmp/unused', training=True)
  assert calls == ([] if outcome == 'not asked' else [{}])
  assert ('trains as one process' in caplog.text) == (outcome == 'one process'), caplog.text


@pytest.mark.skipif(runtime.computation_platform() != 'cpu'
                    or any('cuda' not in plugin for plugin in runtime.pjrt_plugins()),
                    reason='an accelerator or a PJRT plugin other than CUDA\'s is installed')
def test_cuda_plugin_without_a_visible_gpu_computes_on_the_cpu(tmp_path):
  # The test extra's own CUDA plugin (compiling for a GPU, `compile_targets.devices_not_here`)
  # beside a second one.
  assert _tune(tmp_path, '', plugin='xla_cuda99')[:2] == ('cpu', ['cpu'])


def test_cuda_check_is_skipped_only_where_jax_computes_elsewhere(monkeypatch):
  for platform, skipped in (('cpu', True), ('tpu', True), ('gpu', False)):
    monkeypatch.delenv('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', raising=False)
    monkeypatch.setattr(runtime, 'computation_platform', lambda platform=platform: platform)
    assert runtime.skip_unused_cuda_check() == skipped
    assert ('JAX_SKIP_CUDA_CONSTRAINTS_CHECK' in os.environ) == skipped
  # The user's own setting stands.
  monkeypatch.setenv('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  assert runtime.skip_unused_cuda_check()


def test_several_cuda_plugins_are_named_on_a_gpu(monkeypatch, caplog):
  monkeypatch.setattr(runtime, 'computation_platform', lambda: 'gpu')
  monkeypatch.setattr(runtime, 'use_cublas_gemms', lambda: True)
  monkeypatch.setattr(runtime, 'allocate_gpu_memory_as_needed', lambda: True)
  for plugins, warned in (({'jax_plugins.xla_cuda13'}, False),
                          ({'jax_plugins.xla_cuda12', 'jax_plugins.xla_cuda13'}, True)):
    monkeypatch.setattr(runtime, 'pjrt_plugins', lambda plugins=plugins: plugins)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert runtime.tune_for_platform(training=True) == 'gpu'
    assert ('xla_cuda12, jax_plugins.xla_cuda13 are all installed' in caplog.text) == warned


_START_JAX = '''
import sys
import jax
from hded_jax import runtime
if sys.argv[1] == 'entry point':
  runtime.tune_for_platform(training=False)
print(jax.devices()[0].platform)
'''


@pytest.mark.skipif(runtime.computation_platform() == 'gpu'
                    or not runtime.cuda_plugins(),
                    reason='no CUDA plugin, or JAX computes on a GPU here')
def test_entry_points_start_a_cuda_plugin_without_cuda_quietly():
  """The test extra's CUDA plugin has none of CUDA's libraries: JAX's check of them printed a
  traceback (26 lines) at every start of train.py, eval.py or predict.py on a CPU machine."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_SKIP_CUDA_CONSTRAINTS_CHECK'}
  env['PYTHONPATH'] = REPO
  def start(how):
    return subprocess.run([sys.executable, '-c', _START_JAX, how], cwd=REPO, check=True,
                          capture_output=True, text=True, env=env)
  entry_point = start('entry point')
  assert entry_point.stdout.split() == ['cpu']
  assert 'Jax plugin configuration error' not in entry_point.stderr, entry_point.stderr
  bare = start('bare')
  if 'Jax plugin configuration error' not in bare.stderr:
    pytest.skip('CUDA\'s libraries are installed: the check passes without a GPU')


# The XLA options JAX compiles with after the set-up: GPU autotune cache directory, GPU kernel
# cache file.
_XLA_CACHE_OPTIONS = '''
import sys
import jax
from hded_jax import runtime
from jax._src import compiler
runtime.enable_compilation_cache(sys.argv[1])
compile_options = compiler.get_compile_options(1, 1, backend=jax.devices()[0].client)
debug = compile_options.executable_build_options.debug_options  # Owned by compile_options.
print(debug.xla_gpu_per_fusion_autotune_cache_dir or '-', debug.xla_gpu_kernel_cache_file or '-')
'''


# Two compilation caches one after the other in one process: where each program is written.
_CACHE_MOVES = '''
import os, sys
import jax, jax.numpy as jnp
from hded_jax import runtime
for name in ('first', 'second'):
  runtime.enable_compilation_cache(os.path.join(sys.argv[1], name))
  jax.jit(lambda x: jnp.sin(x) * len(name)).lower(jnp.ones(3)).compile()
  print(name, os.path.isdir(os.path.join(sys.argv[1], name)))
'''


def test_a_new_compilation_cache_directory_takes_effect_after_a_compile(tmp_path):
  """JAX opens its cache once; a later `enable_compilation_cache` (a test's own cache, a second
  run in a notebook) must move it, or its programs land in, and are read from, the first."""
  assert _child_stdout(_CACHE_MOVES, str(tmp_path)).split() == ['first', 'True', 'second', 'True']


def test_gpu_autotune_results_are_kept_beside_the_compilation_cache(tmp_path):
  def xla_caches(**env):
    base = {k: v for k, v in os.environ.items() if k != 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES'}
    return _child_stdout(_XLA_CACHE_OPTIONS, str(tmp_path), env=dict(base, **env)).split()

  assert xla_caches() == [str(tmp_path / 'xla_gpu_per_fusion_autotune_cache_dir'), '-']
  # The user's choice stands.
  assert xla_caches(JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES='xla_gpu_kernel_cache_file') == [
      '-', str(tmp_path / 'xla_gpu_kernel_cache_file')]


def test_gpu_autotune_results_in_the_cache_are_counted(own_program_cache):
  """The benchmark's JSON says on a GPU whether XLA kept its autotune results there."""
  kept = os.path.join(os.path.dirname(own_program_cache), 'xla_gpu_per_fusion_autotune_cache_dir')
  assert runtime.gpu_autotune_cache_entries() == 0
  os.makedirs(os.path.join(kept, 'sm_90'))
  for name in ('a.textproto', 'sm_90/b.textproto'):
    open(os.path.join(kept, name), 'w').close()
  assert runtime.gpu_autotune_cache_entries() == 2


def test_cublas_gemms_flag_joins_xla_flags_unless_the_user_chose(monkeypatch):
  devices = '--xla_force_host_platform_device_count=2'
  monkeypatch.setenv('XLA_FLAGS', devices)
  # The same as one compile's options, for a GPU this process does not compute on.
  assert runtime.gpu_compiler_options() == {'xla_gpu_enable_triton_gemm': False}
  assert runtime.use_cublas_gemms()
  assert runtime.use_cublas_gemms()  # Idempotent.
  assert os.environ['XLA_FLAGS'] == f'{devices} {runtime._CUBLAS_GEMMS_FLAG}'
  # XLA, which aborts on flags it does not know, knows it (CPU builds parse GPU flags too).
  assert _child_stdout('import jax; print(jax.numpy.ones(2).sum())', env=dict(
      _env_without_xla_flags(), XLA_FLAGS=os.environ['XLA_FLAGS'])).split()[-1] == '2.0'
  users = '--xla_gpu_enable_triton_gemm=true'
  monkeypatch.setenv('XLA_FLAGS', users)
  assert not runtime.use_cublas_gemms()
  assert os.environ['XLA_FLAGS'] == users
  assert runtime.gpu_compiler_options() == {}
  # Another flag whose name begins with this one's is not this one.
  other = '--xla_gpu_enable_triton_gemm_any=true'
  monkeypatch.setenv('XLA_FLAGS', other)
  assert runtime.gpu_compiler_options() == {'xla_gpu_enable_triton_gemm': False}
  assert runtime.use_cublas_gemms()
  assert os.environ['XLA_FLAGS'] == f'{other} {runtime._CUBLAS_GEMMS_FLAG}'


def test_processes_that_do_not_train_take_gpu_memory_as_needed(monkeypatch):
  """eval.py beside train.py on one GPU: JAX's client takes 75% of the card when it starts, so
  the second process must not ask for its own 75%."""
  monkeypatch.setattr(runtime, 'computation_platform', lambda: 'gpu')
  monkeypatch.setattr(runtime, 'use_cublas_gemms', lambda: True)
  for name in runtime._GPU_MEMORY_SETTINGS:
    monkeypatch.delenv(name, raising=False)
  assert runtime.tune_for_platform(training=True) == 'gpu'
  assert xla_client.generate_pjrt_gpu_plugin_options().get('preallocate', True)
  assert runtime.tune_for_platform(training=False) == 'gpu'
  # What JAX's CUDA plugin is given when its backend starts.
  assert xla_client.generate_pjrt_gpu_plugin_options()['preallocate'] is False
  # The benchmark beside PyTorch (--torch) trains and shares the card.
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE')
  runtime.tune_for_platform(training=True, share_gpu=True)
  assert xla_client.generate_pjrt_gpu_plugin_options()['preallocate'] is False
  # The user's own memory setting stands.
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE')
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '.2')
  assert not runtime.allocate_gpu_memory_as_needed()
  assert 'XLA_PYTHON_CLIENT_PREALLOCATE' not in os.environ


def test_eigen_convolutions_flag_joins_xla_flags_unless_the_user_chose(monkeypatch):
  devices = '--xla_force_host_platform_device_count=2'
  monkeypatch.setenv('XLA_FLAGS', devices)
  monkeypatch.setattr(runtime, '_EIGEN_CONVOLUTIONS_JAXLIBS',
                      ((0, 0), jaxlib.version.__version_info__[:2]))
  assert runtime.use_eigen_convolutions()
  assert os.environ['XLA_FLAGS'] == f'{devices} {runtime._EIGEN_CONVOLUTIONS_FLAG}'
  assert runtime.use_eigen_convolutions()  # Idempotent.
  assert os.environ['XLA_FLAGS'] == f'{devices} {runtime._EIGEN_CONVOLUTIONS_FLAG}'
  users = '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution'
  monkeypatch.setenv('XLA_FLAGS', users)
  assert not runtime.use_eigen_convolutions()
  assert os.environ['XLA_FLAGS'] == users
  monkeypatch.setenv('XLA_FLAGS', devices)
  monkeypatch.setattr(runtime, '_EIGEN_CONVOLUTIONS_JAXLIBS', ((0, 0),))  # Other jaxlibs.
  assert not runtime.use_eigen_convolutions()
  assert os.environ['XLA_FLAGS'] == devices


def test_restart_recompiles_nothing(tiny_data_dir, tmp_path):
  """A resumed run finds every program it compiles in the workdir's persistent cache."""
  workdir = str(tmp_path / 'run')
  # The cache goes to WORKDIR/jax_cache unless the variable names another place.
  run = functools.partial(launch, tiny_data_dir, workdir, num_steps=4, batch_size=4,
                          checkpoint_every_steps=2, extra_env={'HDED_JAX_CACHE_DIR': ''})
  finish(run())
  cache = os.path.join(workdir, 'jax_cache')
  compiled = sorted(os.listdir(cache))
  assert any(name.startswith('jit_train_step') for name in compiled)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # As if preempted after step 2.
  out = finish(run())
  assert 'final step 4' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))  # It trained steps 3 and 4.
  assert sorted(os.listdir(cache)) == compiled  # Every cache key was there already.


def _error_raised_in(filename: str, message: str = 'damaged'):
  """The exc_info of an error saying ``message`` raised by code that ``filename`` holds."""
  namespace = {}
  exec(compile(f'def read():\n  raise ValueError({message!r})\n', filename, 'exec'), namespace)
  try:
    namespace['read']()
  except ValueError:
    return sys.exc_info()


def test_readable_logs_drop_only_orbax_tasks_that_nobody_awaited():
  """asyncio reports them when the task is garbage-collected, after the damaged step that caused
  them was already reported with its path (a random moment: tests that grep logs then flake)."""
  def record(name, filename, msg='Task exception was never retrieved\nfuture: <Task finished>',
             error='damaged'):
    return logging.LogRecord(name, logging.ERROR, 'base_events.py', 1, msg, None,
                             _error_raised_in(filename, error))

  orbax = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint', 'serialization.py')
  assert runtime._orbax_task_left_behind(record('asyncio', orbax))
  # A TensorStore future awaited as a task: only asyncio's frames (seen once in CI after Ctrl-C).
  tasks = os.path.join(os.sep, 'python3.11', 'asyncio', 'tasks.py')
  tensorstore_error = ('NOT_FOUND: Error opening "ocdbt" driver [tensorstore_spec=\'{"driver": '
                       '"ocdbt"}\']')
  assert runtime._orbax_task_left_behind(record('asyncio', tasks, error=tensorstore_error))
  assert not runtime._orbax_task_left_behind(record('asyncio', tasks))
  # A gathered future of Orbax's writers, left by a save that failed (a full disk).
  assert runtime._orbax_task_left_behind(record(
      'asyncio', orbax, msg='_GatheringFuture exception was never retrieved'))
  assert not runtime._orbax_task_left_behind(record('asyncio', '/site-packages/ours/io.py'))
  assert not runtime._orbax_task_left_behind(record('asyncio', orbax, msg='Unclosed client'))
  assert not runtime._orbax_task_left_behind(record('absl', orbax))


def test_readable_logs_drop_expected_warnings_and_orbax_tracebacks():
  script = '''
import logging as python_logging
import sys
from absl import logging
from hded_jax import runtime
logging.use_absl_handler()
runtime.readable_logs()
python_logging.getLogger('orbax').warning('Given directory is read only=/run/checkpoints')
python_logging.getLogger('tfds').warning('OpenCV is not installed. We recommend using OpenCV')
python_logging.getLogger('tfds').warning('Variant folder %s has no %s', '/d/x/1.0.0', 'info.json')
python_logging.getLogger('orbax').warning('Any other warning')
# Orbax's errors keep their message, not their pages of traceback (a full disk: one per thread).
try:
  raise ValueError('RESOURCE_EXHAUSTED: No space left on device')
except ValueError:
  python_logging.getLogger().handle(python_logging.LogRecord(
      'absl', python_logging.ERROR, '/site-packages/orbax/checkpoint/future.py', 387,
      'Thread raised an exception', None, sys.exc_info()))
'''
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       check=True)
  assert 'Any other warning' in run.stderr and 'Thread raised an exception' in run.stderr
  assert 'read only' not in run.stderr and 'OpenCV' not in run.stderr, run.stderr
  assert 'Variant folder' not in run.stderr, run.stderr
  assert 'Traceback' not in run.stderr, run.stderr


def test_metric_writer_keeps_training_without_tensorboard_summaries(tmp_path, monkeypatch,
                                                                    caplog):
  """A TensorFlow stand-in without tf.summary (as on a machine set up to measure) costs the
  event files only; real TensorFlow writes them."""
  writer = runtime.metric_writer(str(tmp_path / 'real'))
  writer.write_scalars(1, {'loss': 1.0})
  writer.close()
  assert any(name.startswith('events.out') for name in os.listdir(tmp_path / 'real'))

  monkeypatch.setitem(sys.modules, 'tensorflow', types.SimpleNamespace(__file__='stub/tensorflow'))
  with caplog.at_level(logging.WARNING):
    writer = runtime.metric_writer(str(tmp_path / 'stub'))
  writer.write_scalars(1, {'loss': 1.0})
  writer.close()
  assert not (tmp_path / 'stub').exists()
  assert 'no tf.summary' in caplog.text and 'tensorflow-cpu' in caplog.text


def test_tensorflow_is_kept_off_the_accelerators(monkeypatch):
  hidden = []
  stand_in = types.SimpleNamespace(config=types.SimpleNamespace(
      set_visible_devices=lambda devices, kind: hidden.append((devices, kind))))
  monkeypatch.setitem(sys.modules, 'tensorflow', stand_in)
  assert runtime.tensorflow() is stand_in and hidden == [([], 'GPU'), ([], 'TPU')]


def test_train_py_imports_tensorflow_only_for_its_writer(tmp_path):
  """Neither train.py's imports nor its set-up import TensorFlow (~2 s): train_lib.train makes
  its writer once the state is restored, beside XLA loading the step (test_train checks where)."""
  assert _child_stdout(
      'import sys, train\nfrom hded_jax import runtime\n'
      'runtime.setup(sys.argv[1], training=True)\nprint("tensorflow" in sys.modules)',
      str(tmp_path)).split()[-1] == 'False'


def test_process_age_counts_from_the_process_start():
  age = float(_child_stdout('import time; time.sleep(1.0)\n'
                            'from hded_jax import runtime; print(runtime.process_age_s())'))
  assert 1.0 <= age < 60.0


_URL_CALLS = {
    'setup': lambda url: runtime.setup(url, training=True),
    'train': lambda url: train_lib.train(tiny_config('/nonexistent'), url),
    'evaluate': lambda url: eval_lib.evaluate(None, url, timeout_secs=0),
    'evaluate_once': lambda url: eval_lib.evaluate(None, url, once=True, timeout_secs=0),
    'predict': lambda url: predict_lib.run('/nonexistent', '*.png', url),
    'predict_files': lambda url: predict_lib.predict_files(None, [], url),
    'convert': lambda url: weights.write_official('model.pth.tar', url),
    'encoder_init': lambda url: checkpoints.load_encoder_init(None, url),
}


@pytest.mark.parametrize('entry', sorted(_URL_CALLS))
def test_urls_are_refused_before_anything_is_written(entry, tmp_path, monkeypatch):
  """A URL is no local path: os.path would make gs://bucket/run a folder 'gs:' in the current
  one, and a run on a Cloud TPU VM would keep its checkpoints on the VM's own disk."""
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r'gs://bucket/run is a URL: .*gcsfuse'):
    _URL_CALLS[entry]('gs://bucket/run')
  assert not os.listdir(tmp_path)


def test_a_url_cache_directory_is_refused(tmp_path, monkeypatch):
  monkeypatch.setenv('HDED_JAX_CACHE_DIR', 'gs://bucket/cache')
  with pytest.raises(ValueError, match='gs://bucket/cache is a URL'):
    runtime.setup(str(tmp_path), training=True)


def test_local_paths_are_absolute_with_the_home_directory_expanded(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', '/home/someone')
  assert runtime.local_path('run') == str(tmp_path / 'run')
  assert runtime.local_path('~/run') == '/home/someone/run'


def test_usable_cores_are_the_affinity_where_the_system_has_one(monkeypatch):
  assert runtime.usable_cores() == len(os.sched_getaffinity(0))
  monkeypatch.delattr(os, 'sched_getaffinity')  # macOS, Windows: the dataset build still starts.
  assert runtime.usable_cores() == os.cpu_count()
