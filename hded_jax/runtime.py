"""Process set-up shared by the entry points: per-backend tuning, multi-host init, compilation
cache, flag parsing that ends config mistakes in one line, readable logs."""

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import logging as python_logging
import os
import pkgutil
import re
import sys
import traceback
import types
import typing

from absl import logging
import jax
from jax.experimental.compilation_cache import compilation_cache
import jaxlib.version

from hded_jax import files

if typing.TYPE_CHECKING:
  from clu import metric_writers


def setup(workdir: str, *, training: bool, distributed: bool = True) -> None:
  """``training``: whether this process trains (train.py) or only evaluates (eval.py), which
  decides the CPU's convolutions (``tune_for_platform``)."""
  cache_dir = local_path(os.environ.get('HDED_JAX_CACHE_DIR')
                         or os.path.join(local_path(workdir), 'jax_cache'))
  tune_for_platform(training=training)
  if distributed and (_is_multihost_env() or computation_platform() == 'tpu'):
    _initialize_distributed()
  # Restarts (resume after preemption, eval beside train) reuse compiled programs.
  enable_compilation_cache(cache_dir)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s); compilation cache %s.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, cache_dir)


def local_path(path: str) -> str:
  """``path`` absolute, ``~`` expanded; a URL refused (`files.not_local`), naming the mount
  that serves the same purpose."""
  if reason := files.not_local(path):
    raise ValueError(reason)
  return os.path.abspath(os.path.expanduser(path))


# XLA caches that JAX keeps inside the compilation cache directory; pure caches, no setting
# that changes what is compiled. On a GPU the per-fusion autotune results let a program that
# misses the compilation cache (another batch size, the eval program) skip autotuning the
# fusions and convolutions it shares with one compiled before.
_XLA_CACHES = 'xla_gpu_per_fusion_autotune_cache_dir'


def enable_compilation_cache(cache_dir: str) -> None:
  """Persists every compiled program in ``cache_dir``, however small or quick to compile, and
  XLA's GPU autotune results beside them (unless JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES says
  otherwise, e.g. ``all`` to add XLA's GPU kernel cache)."""
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  if 'JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES' not in os.environ:
    jax.config.update('jax_persistent_cache_enable_xla_caches', _XLA_CACHES)
  # JAX opens its cache at the first compile and keeps that directory until reset: without this,
  # a process that compiled before (a test, a notebook) would go on reading and writing the old.
  compilation_cache.reset_cache()


def gpu_autotune_cache_entries() -> int | None:
  """How many results XLA's GPU autotuner keeps in the compilation cache's directory (a file
  per convolution, GEMM or fusion it tuned; ``enable_compilation_cache``), None without a
  cache: after a cold compile on a GPU, 0 means this XLA keeps them elsewhere."""
  cache_dir = jax.config.values.get('jax_compilation_cache_dir')
  if not cache_dir:
    return None
  return sum(len(files) for _, _, files in os.walk(os.path.join(cache_dir, _XLA_CACHES)))


def tensorflow() -> types.ModuleType:
  """TensorFlow, kept off the accelerators: TFDS's dataset builds and clu's TensorBoard writer
  use it for I/O only, and on a GPU its runtime would claim memory that JAX needs. Imported
  where first needed, not at start-up: its import takes seconds, which train.py spends beside
  XLA's compile or program load, and predict.py never."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if hasattr(tf, 'config'):  # A stand-in for TensorFlow may have none.
    for kind in ('GPU', 'TPU'):
      tf.config.set_visible_devices([], kind)
  return tf


def metric_writer(logdir: str) -> 'metric_writers.MetricWriter':
  """clu's writer: metrics to the log, and to TensorBoard event files in ``logdir`` from process
  0. Where TensorFlow lacks its summary ops (a stand-in for TensorFlow, as on machines set up to
  measure only) training goes on with the log alone."""
  tf = tensorflow()  # Before clu's writers import it.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  just_logging = jax.process_index() > 0
  if not just_logging and not hasattr(tf, 'summary'):
    logging.warning('This TensorFlow (%s) has no tf.summary: no TensorBoard event files, metrics '
                    'go to the log only. Install tensorflow-cpu to get them.',
                    getattr(tf, '__file__', tf))
    just_logging = True
  return metric_writers.create_default_writer(logdir, just_logging=just_logging)


def is_out_of_memory(error: Exception) -> bool:
  """Whether a JAX runtime error is the device's memory running out (XLA's status code)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(error)


def usable_cores() -> int:
  """The CPU cores this process may run on: its affinity (a pinned or containerised job), where
  the system has one (Linux), else all of the machine's."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows.
    return os.cpu_count() or 1


def _initialize_distributed() -> None:
  """``jax.distributed`` over the cluster JAX detects (a Cloud TPU slice from its VMs'
  metadata, SLURM, Open MPI) or that JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID describe. Orbax's checkpoints need it wherever there are several processes,
  and a TPU slice's hosts name no variable for `_is_multihost_env`, so every TPU host starts
  it (one process on a single-host slice); one that JAX does not recognise as a Cloud TPU VM
  trains as one process."""
  env = {k: int(os.environ[v]) for k, v in (('num_processes', 'JAX_NUM_PROCESSES'),
                                            ('process_id', 'JAX_PROCESS_ID'))
         if v in os.environ}
  try:
    jax.distributed.initialize(**env)
  except Exception as error:  # pylint: disable=broad-except
    # JAX's TPU cluster detection queries the VM's metadata server (requests' errors).
    if _is_multihost_env():
      raise
    logging.warning('No jax.distributed on this TPU host (%s: %s): it trains as one process. '
                    'On a multi-host slice set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and '
                    'JAX_PROCESS_ID.', type(error).__name__, error)


def _is_multihost_env() -> bool:
  """True on TPU pods, SLURM/GPU clusters or when JAX_COORDINATOR_ADDRESS is set."""
  return any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
                                        'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'))


def process_age_s() -> float | None:
  """Seconds since this process started (Linux; else None): what a start or restart costs up
  to, e.g., the end of its first train step."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
  except (OSError, IndexError, ValueError):
    return None
  return uptime - start_ticks / os.sysconf('SC_CLK_TCK')


def tune_for_platform(*, training: bool, share_gpu: bool | None = None) -> str | None:
  """Process-wide settings measured to make this project fast on the platform the computation
  runs on (``computation_platform``), applied only there; call before JAX computes anything.

  On the CPU: glibc keeps freed memory, programs run on the calling thread, and where
  ``training`` (the process runs gradients, not the forward alone) convolutions on Eigen. On a
  GPU: matrix products on cuBLAS, and where ``share_gpu`` (default: not ``training``) memory
  taken as needed. Elsewhere nothing. Off a GPU also ``skip_unused_cuda_check``. The entry
  points call it (``setup`` for train.py and eval.py; predict.py, the benchmark). Returns the
  platform whose settings were applied ('cpu' or 'gpu'), or None.
  """
  skip_unused_cuda_check()
  platform = computation_platform()
  if platform == 'cpu':
    keep_freed_memory()
    run_programs_on_the_calling_thread()
    if training:
      use_eigen_convolutions()
    return platform
  if platform == 'gpu':
    warn_of_several_cuda_plugins()
    use_cublas_gemms()
    if share_gpu is None:
      share_gpu = not training
    if share_gpu:
      allocate_gpu_memory_as_needed()
    return platform
  logging.info('Computing on %s: no settings measured there; XLA flags left alone.', platform)
  return None


def skip_unused_cuda_check() -> bool:
  """Skips the check of CUDA's libraries that JAX's CUDA plugin makes when JAX starts, where JAX
  will not compute on a GPU (``computation_platform``). There it can only fail, with a
  traceback at every start where the plugin came without CUDA's libraries, as the test extra
  installs it; skipped, the plugin starts and can describe GPUs to compile for
  (``compile_targets.devices_not_here``). Where JAX computes on a GPU the check stays: it names a
  missing or mismatched library. JAX reads JAX_SKIP_CUDA_CONSTRAINTS_CHECK when its backends
  start: call before. Returns whether the check is skipped."""
  if computation_platform() != 'gpu':
    os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')
  return bool(os.environ.get('JAX_SKIP_CUDA_CONSTRAINTS_CHECK'))


def warn_of_several_cuda_plugins() -> list[str]:
  """Warns where more than one of JAX's CUDA plugins is installed (e.g. the test extra's CUDA 13
  one beside '.[cuda12]'): JAX starts every plugin whose check passes, in no fixed order, and
  computes with whichever registers first. Returns the plugins' modules."""
  plugins = cuda_plugins()
  if len(plugins) > 1:
    logging.warning('JAX\'s CUDA plugins %s are all installed: JAX starts whichever passes its '
                    'check first, in no fixed order. Keep the one for your CUDA driver, e.g. on '
                    'CUDA 12: pip uninstall -y jax-cuda13-plugin jax-cuda13-pjrt.',
                    ', '.join(plugins))
  return plugins


def computation_platform() -> str:
  """The platform JAX will compute on, decided without starting a backend (XLA reads
  XLA_FLAGS once, when its backend starts, so CPU flags must be chosen before that).

  JAX's own order: the first platform named in JAX_PLATFORMS (or the ``jax_platforms``
  option); otherwise a TPU if libtpu is installed and TPU chips are attached; a GPU if a CUDA
  (ROCm) PJRT plugin is installed and JAX's probe sees an NVIDIA (AMD) device; any other
  installed PJRT plugin, whose device JAX would use; else the CPU. Returns 'cpu', 'gpu', 'tpu'
  or the plugin module's name.
  """
  if platforms := jax.config.jax_platforms:
    first = platforms.split(',')[0].strip()
    return 'gpu' if first in ('cuda', 'rocm') else first
  if (importlib.util.find_spec('libtpu') is not None
      and _probe('num_available_tpu_chips_and_device_id', (1, None))[0] > 0):
    return 'tpu'
  for plugin in sorted(pjrt_plugins()):
    if 'cuda' in plugin:
      if _probe('has_visible_nvidia_gpu', True):
        return 'gpu'
    elif 'rocm' in plugin:
      if _probe('num_available_amd_gpus', 1, stop_at=1) > 0:
        return 'gpu'
    else:
      return plugin.rsplit('.', 1)[-1]
  return 'cpu'


def _probe(name: str, unknown, **kwargs):
  """JAX's own device probe ``name`` (private: ``jax._src.hardware_utils``); ``unknown``, the
  accelerator's presence, where this JAX version lacks it."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return getattr(hardware_utils, name)(**kwargs)
  except (ImportError, AttributeError):
    return unknown


def pjrt_plugins() -> set[str]:
  """Modules of the installed PJRT plugins, found as JAX finds them: the ``jax_plugins``
  namespace package and the ``jax_plugins`` entry points. Nothing is imported or started."""
  spec = importlib.util.find_spec('jax_plugins')
  modules = set()
  if spec is not None and spec.submodule_search_locations:
    modules |= {f'jax_plugins.{m.name}'
                for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  modules |= {e.value for e in importlib.metadata.entry_points(group='jax_plugins')}
  return modules


def cuda_plugins() -> list[str]:
  """Modules of the installed PJRT plugins that are JAX's CUDA plugins (``pjrt_plugins``)."""
  return sorted(plugin for plugin in pjrt_plugins() if 'cuda' in plugin)


def _xla_flags_set(name: str) -> bool:
  """Whether XLA_FLAGS sets the flag ``name`` (no dashes), whose name may begin another's."""
  return any(token.lstrip('-').partition('=')[0] == name
             for token in os.environ.get('XLA_FLAGS', '').split())


def add_xla_flag(flag: str) -> bool:
  """Adds ``flag`` ('--name=value') to XLA_FLAGS unless XLA_FLAGS already sets ``name``: the
  user's choice stands. XLA reads XLA_FLAGS when its backend starts: call it before that.
  Returns whether ``flag`` is in effect."""
  flags = os.environ.get('XLA_FLAGS', '')
  if _xla_flags_set(flag.lstrip('-').partition('=')[0]):
    return flag in flags.split()
  os.environ['XLA_FLAGS'] = f'{flags} {flag}'.strip()
  return True


# XLA flag and the jaxlib minor versions where it was measured faster (docs/performance.md):
# 0.10 (Python 3.11's newest) and 0.12 (Python 3.12's); not 0.11 (no gain on the CPU).
_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
_EIGEN_CONVOLUTIONS_FLAG = f'--{_YNN_FUSION_TYPE}=-individual_convolution'
_EIGEN_CONVOLUTIONS_JAXLIBS = ((0, 10), (0, 12))


def use_eigen_convolutions() -> bool:
  """Has XLA's CPU backend run convolutions with Eigen instead of YNNPACK, its default.

  For this model's training Eigen's are faster in all three passes, most in the kernel
  gradient, on jaxlib 0.10 and 0.12; on 0.11 they gain nothing. The forward alone is faster on
  YNNPACK, so processes that only evaluate keep it (figures: docs/performance.md). The flag is
  experimental and XLA aborts on flags it does not know, so it is set only on the jaxlib
  versions it was measured on, and never over an ``xla_cpu_experimental_ynn_fusion_type`` the
  user put in XLA_FLAGS. It edits XLA_FLAGS, which XLA reads when its backend starts: call it
  before that. Returns whether the flag is in effect.
  """
  if (not _xla_flags_set(_YNN_FUSION_TYPE) and
      jaxlib.version.__version_info__[:2] not in _EIGEN_CONVOLUTIONS_JAXLIBS):
    logging.info('jaxlib %s: XLA CPU convolutions left to XLA (%s was measured faster on %s).',
                 jaxlib.version.__version__, _EIGEN_CONVOLUTIONS_FLAG,
                 ', '.join('%d.%d' % version for version in _EIGEN_CONVOLUTIONS_JAXLIBS))
    return False
  return add_xla_flag(_EIGEN_CONVOLUTIONS_FLAG)


_CUBLAS_GEMMS_FLAG = '--xla_gpu_enable_triton_gemm=false'


def use_cublas_gemms() -> bool:
  """Has XLA's GPU backend compute matrix products with cuBLAS instead of its own Triton
  kernels. The model's 1x1 convolutions are matrix products on a GPU (``model.pointwise_convs``);
  XLA autotunes each Triton GEMM over its tile configurations when it compiles, and on an H100
  that made the train step's compile half as long again, the eval forward's ten times as long,
  for no faster step (docs/performance.md). Never over an
  ``xla_gpu_enable_triton_gemm`` the user put in XLA_FLAGS; XLA reads XLA_FLAGS when its backend
  starts: call it before that. Returns whether the flag is in effect.
  """
  return add_xla_flag(_CUBLAS_GEMMS_FLAG)


def gpu_compiler_options() -> dict[str, bool]:
  """``use_cublas_gemms`` as options of one compile, for a program compiled for a GPU that
  this process does not compute on (`compile_targets.devices_not_here`): its XLA_FLAGS were
  chosen for the CPU. None over an ``xla_gpu_enable_triton_gemm`` the user put in XLA_FLAGS."""
  name, _, value = _CUBLAS_GEMMS_FLAG.removeprefix('--').partition('=')
  return {} if _xla_flags_set(name) else {name: value == 'true'}


# The environment variables with which a user chooses how JAX's GPU client takes memory.
_GPU_MEMORY_SETTINGS = ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                        'XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_ALLOCATOR')


def allocate_gpu_memory_as_needed() -> bool:
  """Stops JAX's GPU client from taking 75% of the card's memory when it starts, for eval.py and
  predict.py: they run beside a train.py that has taken its 75%, and a second process asking
  for 75% more fails (JAX's own advice for several processes on one GPU); and for the
  benchmark beside PyTorch in its own process. Never over a memory setting the user chose; JAX
  reads these when its backend starts: call it before that. Returns whether it applied.
  """
  if any(name in os.environ for name in _GPU_MEMORY_SETTINGS):
    return False
  os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return True


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory mapped for reuse instead of returning it to the OS.

  XLA allocates a program's temporaries afresh on every run (gigabytes for the full train step
  on CPU). glibc's default maps blocks that large on malloc and unmaps them on free, so every
  step faults all their pages in again. No mmap and no trimming keep them in the main arena.
  Threads' own arenas still map blocks over 64 MiB (glibc's fallback there; hence
  ``run_programs_on_the_calling_thread``), but confining every thread to one arena serialises
  XLA's compiler and the step's threads on its lock, which costs far more (figures for both in
  docs/performance.md). The main arena's RSS stays at its peak. Call before the JAX
  backend starts its threads. Returns False where libc is not glibc.
  """
  libc_name = ctypes.util.find_library('c')
  try:
    mallopt = ctypes.CDLL(libc_name).mallopt
  except (OSError, AttributeError, TypeError):
    logging.info('No glibc mallopt (%s); allocator left as it is.', libc_name)
    return False
  # mallopt returns 1 on success; -1 as the trim threshold is SIZE_MAX, i.e. never trim.
  return all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


_ASYNC_DISPATCH_ENV = 'JAX_CPU_ENABLE_ASYNC_DISPATCH'


def run_programs_on_the_calling_thread() -> bool:
  """Has JAX's CPU client run each single-device program on the thread that calls it, the main
  thread, instead of dispatching it to a worker thread.

  glibc gives each thread an arena of its own and maps any block over 64 MiB outside the main
  arena afresh, whatever ``keep_freed_memory`` sets: a worker thread running the full train step
  faults its gigabytes of temporaries in again on every step, a tenth of the step in system time
  (docs/performance.md). The main thread's arena keeps them. Programs over
  several devices are still dispatched (JAX's option only covers single-device ones). Never
  over the user's own ``JAX_CPU_ENABLE_ASYNC_DISPATCH``; read when the CPU backend starts, so
  call it before that. Returns whether programs run on the calling thread.
  """
  option = _ASYNC_DISPATCH_ENV.lower()
  if option not in jax.config.values:
    logging.info('This JAX has no %s: CPU programs dispatched as JAX does.', option)
    return False
  if _ASYNC_DISPATCH_ENV not in os.environ:
    jax.config.update(option, False)
  return not jax.config.values[option]


def _orbax_task_left_behind(record: python_logging.LogRecord) -> bool:
  """asyncio's report of an Orbax task or gathered future whose exception nobody read (it
  comes when the task is garbage-collected, so at a random later moment): raised in Orbax's
  code, or by a TensorStore future that Orbax awaits, whose traceback holds asyncio's frames
  only and whose error names its ``tensorstore_spec``."""
  if record.name != 'asyncio' or not record.exc_info or not re.match(
      r'\w+ exception was never retrieved', str(record.msg)):
    return False
  frames = traceback.extract_tb(record.exc_info[2])
  return (any(f'{os.sep}orbax{os.sep}' in frame.filename for frame in frames)
          or 'tensorstore_spec=' in str(record.exc_info[1]))


# Warnings about what this project does on purpose: opening checkpoints read-only to evaluate
# or predict (Orbax), decoding images with PIL (TFDS recommends installing OpenCV); and TFDS
# finding a dataset's folder not built yet, which the project's own log line says as it builds
# it, or its error as it stops (`input_pipeline.dataset_builder`).
_EXPECTED_WARNINGS = ('Given directory is read only', 'OpenCV is not installed',
                      'Variant folder %s has no %s')


def readable_logs() -> None:
  """Shows the project's own INFO logs (and clu's progress reports) but only the warnings and
  errors of other libraries (Orbax alone writes ~46 INFO lines per checkpoint), and drops what
  Orbax's tasks leave behind after a failed restore or save (already reported with its step and
  path) or Ctrl-C: 'Event loop is closed', asyncio's 'Task exception was never retrieved', the
  tracebacks of Orbax's errors (their messages stay), and ImportErrors of objects collected as
  the interpreter shuts down; and warnings about what the project does on purpose
  (``_EXPECTED_WARNINGS``).
  ``--verbosity=1`` (or more) shows everything. Call from a program's main, after flag parsing.
  """
  if logging.get_verbosity() > logging.INFO:
    return
  package_dir = os.path.dirname(os.path.abspath(__file__))
  ours = (package_dir + os.sep, os.path.join(os.path.dirname(package_dir), 'tfds_builders', ''),
          os.path.abspath(sys.argv[0]))
  progress = f'{os.sep}clu{os.sep}'

  def keep(record: python_logging.LogRecord) -> bool:
    if _orbax_task_left_behind(record) or str(record.msg).startswith(_EXPECTED_WARNINGS):
      return False
    path = os.path.abspath(record.pathname)
    if f'{os.sep}orbax{os.sep}' in path and record.levelno >= python_logging.ERROR:
      # E.g. a failed save's error, once per writer thread, each with pages of traceback: the
      # message is kept, and the save's own error ends the run (checkpoints.save_train_state).
      record.exc_info = record.exc_text = None
    return (record.levelno >= python_logging.WARNING or path.startswith(ours)
            or progress in path)

  logging.get_absl_handler().addFilter(keep)
  default_hook = sys.unraisablehook

  def unraisable(report):
    # E.g. Orbax's writers abandoned by a failed save, collected as the interpreter shuts down.
    if not ((isinstance(report.exc_value, RuntimeError)
             and str(report.exc_value) == 'Event loop is closed') or
            (isinstance(report.exc_value, ImportError)
             and 'Python is likely shutting down' in str(report.exc_value))):
      default_hook(report)

  sys.unraisablehook = unraisable
