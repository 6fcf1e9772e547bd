"""Times the full training and inference programs of a config: compile, step, memory, FLOPs
(`python -m hded_jax.benchmark` is the command).

Measures, at the config's image size and batch: compile time of the train step (the jitted
`train_lib.Trainer.step_fn`, i.e. what `train.py` runs) and of the eval forward; images/s as the
median of timed steps after warm-up (synchronised with `block_until_ready`); peak device memory
(`device.memory_stats()`; on CPU, which reports none, the process's max RSS plus XLA's own buffer
sizes); XLA's FLOP count (`cost_analysis()`) and the FLOP/s achieved; the input pipeline's
examples/s on its own (the prepared dataset if there is one, else an in-memory source of
NYU-sized 480x640 frames); on an accelerator, FLOP/s as a share of the devices' dense bf16 peak;
on a GPU, the kernels each program launches per run (`lowering.kernel_launches`).
With ``config.dataset.camera`` the train step renders its inputs (`input_pipeline.Rendering`);
that rendering (with ``rendering``, also when the config renders nothing: then with focus
distances drawn from ``RENDERING_FOCUS_RANGE``) is timed alone, and what it adds to the train
step reported.
``with_torch`` also times the PyTorch reference (`hded_jax.pytorch.reference`) on the same device:
on a CPU in float32 with all cores, on CUDA in float32 (TF32 off), TF32 and bf16 autocast, all
channels_last with cudnn.benchmark, so every ratio comes from one process on one device.
`largest_batches` finds the largest batch whose train step fits in device memory.
``profile_dir`` keeps a JAX profiler trace of a few train steps and the compiled train program,
and sums the trace's device time per op; ``compile_profile_dir`` one of the train step's XLA
compile, summed per compiler pass and phase.
``op_counts`` lowers the train step and the eval forward for GPU and TPU on this machine and
records their op counts (`lowering`): what an accelerator would be asked to compile.
``compile_for`` compiles them for a TPU slice or a GPU that this machine lacks, with XLA's TPU or
GPU compiler (`devices_not_here`, `compile_for_devices`): compile time, memory per device and,
for a GPU, the calls its autotuner would time, before renting the machine.

The machine may be shared: before each timed run the benchmark waits (up to ``--max_wait``
seconds) until other processes keep fewer than ``--max_busy_cores`` cores busy, and records that
figure and the 1-minute load average beside each result.
"""

from collections.abc import Callable, Mapping, Sequence
import collections
from concurrent import futures
import dataclasses
import functools
import glob
import gzip
import importlib.util
import json
import os
import re
import resource
import statistics
import tempfile
import time
from typing import TypeVar

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from hded_jax import defocus
from hded_jax import input_pipeline
from hded_jax import lowering
from hded_jax import models
from hded_jax import pytorch
from hded_jax import runtime
from hded_jax import sharding
from hded_jax import train_lib

T = TypeVar('T')

# The NYU Depth v2 frame size; the synthetic pipeline source resizes from it like the real one.
NYU_FRAME = (480, 640)

# Dense bf16 peak FLOP/s of one device, by a substring of its device_kind (vendor datasheets;
# most specific first).
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12),
    ('L4', 121e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
    ('TPU v6', 918e12),
)


# High-bandwidth memory of one TPU chip, by a substring of its device_kind (Cloud TPU's chip
# specifications, in GB; most specific first): what a batch must fit where no chip reports its
# own (compiling for a slice this machine lacks, `devices_not_here`).
TPU_HBM_BYTES = (
    ('TPU v5 lite', 16e9), ('TPU v5', 95e9), ('TPU v6 lite', 32e9), ('TPU v4', 32e9),
)

# XLA's descriptions of GPUs (GpuTargetConfigProto text), to compile for one that this machine
# lacks: `--compile_for=h100` reads gpu_targets/h100.pbtxt.
GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
# The share of a GPU's memory that JAX's allocator may use unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (JAX's GPU memory allocation docs), whether it preallocates or not.
JAX_GPU_MEMORY_FRACTION = 0.75

# The focus distances rendered when the benchmark times rendering for a config without a camera.
RENDERING_FOCUS_RANGE = (1.5, 3.0)
# The largest-batch search ends where the batch that fits is this close to the limit.
LARGEST_BATCH_TOLERANCE = 0.05


def peak_bf16_flops(device_kind: str) -> float | None:
  return next((flops for kind, flops in PEAK_BF16_FLOPS if kind in device_kind), None)


@dataclasses.dataclass(frozen=True)
class DevicesNotHere:
  """Devices described without them (`devices_not_here`): programs compile for them on this
  machine, with their platform's XLA compiler, and cannot run."""
  target: str  # As named: 'v5e:2x2', 'h100', 'h100:8', a GpuTargetConfigProto file.
  devices: list[jax.Device]
  memory_bytes: int | None  # What a program may use on each device.


def devices_not_here(target: str) -> DevicesNotHere:
  """The devices that ``target`` names: a TPU slice as JAX names it ('v5e:2x2', 'v4:2x2x1',
  'v6e:4x4'...), described by libtpu; or GPUs, described by JAX's CUDA plugin: a card named in
  ``GPU_TARGETS_DIR`` ('h100', 'h200') or described in a GpuTargetConfigProto file ('.pbtxt'),
  one of it, or several after a colon: 'h100:8' (8 on one host), 'h100:2x8' (2 hosts of 8)."""
  gpus = _gpu_target(target)
  if gpus is not None or ':' not in target:
    return _gpus_not_here(target, gpus)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError(f'Compiling for the TPU slice {target!r} needs libtpu, XLA\'s TPU '
                     "compiler: pip install -e '.[tpu]' (Linux on x86-64).")
  # No chips to guard: without this, a second process (pytest's workers) finds libtpu's
  # lockfile taken and cannot describe the slice.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    devices = list(topologies.get_topology_desc(topology_name=target, platform='tpu').devices)
  except Exception as error:  # pylint: disable=broad-except
    # libtpu's own error names neither the argument nor a valid form.
    raise ValueError(f'libtpu could not describe the TPU slice {target!r} ({error}); name '
                     "one as 'v5e:2x2', 'v4:2x2x1' or 'v6e:4x4' (version:chips per axis), or "
                     f"GPUs as one of {_known_gpus()} ('h100:8': 8 on one host).") from error
  hbm = next((int(hbm) for kind, hbm in TPU_HBM_BYTES if kind in devices[0].device_kind), None)
  return DevicesNotHere(target, devices, hbm)


def _known_gpus() -> list[str]:
  return sorted(name.removesuffix('.pbtxt') for name in os.listdir(GPU_TARGETS_DIR))


def _gpu_target(target: str) -> tuple[str, int, int] | None:
  """(the card's description file, hosts, GPUs per host) where ``target`` names GPUs, else
  None."""
  card, _, count = target.rpartition(':')
  counts = re.fullmatch(r'(?:(\d+)x)?(\d+)', count)
  if not card or not counts:
    card, counts = target, None
  if card.endswith('.pbtxt'):
    path = card
  elif card.lower() in _known_gpus():
    path = os.path.join(GPU_TARGETS_DIR, f'{card.lower()}.pbtxt')
  else:
    return None
  return path, *((int(counts.group(1) or 1), int(counts.group(2))) if counts else (1, 1))


def _gpus_not_here(target: str, gpus: tuple[str, int, int] | None) -> DevicesNotHere:
  """GPUs described by JAX's CUDA plugin from XLA's description of the card."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if gpus is None:
    raise ValueError(f'No GPU or TPU slice named {target!r}: name a TPU slice as \'v5e:2x2\' '
                     f'(version:chips per axis), a GPU as one of {_known_gpus()} or a file of '
                     'XLA\'s GpuTargetConfigProto (.pbtxt) describing the card, several as '
                     '\'h100:8\' (8 on one host) or \'h100:2x8\' (2 hosts of 8).')
  path, hosts, per_host = gpus
  if not os.path.isfile(path):
    raise ValueError(f'No file {path!r} describing a GPU (XLA\'s GpuTargetConfigProto), or name '
                     f'a GPU as one of {_known_gpus()}.')
  if min(hosts, per_host) < 1:
    raise ValueError(f'{target!r} names no GPU: give at least one host and one GPU on it.')
  if not runtime.cuda_plugins():
    raise ValueError(f'Compiling for the GPU {target!r} needs JAX\'s CUDA plugin: pip install '
                     "-e '.[test]' (Linux on x86-64), or pip install 'jax[cuda13-local]'.")
  with open(path) as f:
    text = f.read()
  try:
    devices = list(topologies.get_topology_desc(target, 'cuda', target_config=text,
                                                topology=f'1x{hosts}x{per_host}').devices)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f'JAX\'s CUDA plugin could not describe the GPU {target!r} ({error}). Without a GPU '
        'the plugin starts only if JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set before JAX starts '
        '(python -m hded_jax.benchmark sets it there: runtime.skip_unused_cuda_check), and '
        'reads the file as XLA\'s GpuTargetConfigProto.') from error
  size = re.search(r'device_memory_size:\s*(\d+)', text)
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_GPU_MEMORY_FRACTION))
  return DevicesNotHere(target, devices, int(int(size.group(1)) * fraction) if size else None)


def device_memory_bytes(device: jax.Device) -> int | None:
  """The memory a program may use on ``device`` as it reports it; None where it does not (the
  CPU)."""
  stats = device.memory_stats() or {}
  return int(stats['bytes_limit']) if 'bytes_limit' in stats else None


def machine_load(sample_s: float = 1.0) -> dict[str, float]:
  """Cores kept busy by other processes over ``sample_s`` (from /proc/stat, minus this process)
  and the 1-minute load average (which also counts this process's recent compiles)."""
  def busy_and_self():
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # Minus idle and iowait.
    times = os.times()
    return busy, times.user + times.system

  hz = os.sysconf('SC_CLK_TCK')
  busy0, self0 = busy_and_self()
  start = time.perf_counter()
  time.sleep(sample_s)
  busy1, self1 = busy_and_self()
  elapsed = time.perf_counter() - start
  others = max(0.0, (busy1 - busy0) / hz - (self1 - self0)) / elapsed
  return {'other_busy_cores': round(others, 2), 'loadavg_1min': os.getloadavg()[0]}


def wait_for_quiet(max_busy_cores: float, max_wait: float) -> dict[str, float]:
  """Waits until other processes leave the CPU (or ``max_wait`` passes); returns the load."""
  deadline = time.monotonic() + max_wait
  load = machine_load()
  while load['other_busy_cores'] > max_busy_cores and time.monotonic() < deadline:
    time.sleep(5.0)
    load = machine_load()
  return load


def time_steps(step: Callable[[], object], *, steps: int, warmup: int) -> dict[str, float]:
  """Median and spread of ``steps`` timed calls of ``step`` (which blocks until done)."""
  if steps < 1:
    raise ValueError(f'steps={steps}: time at least one step.')
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times)}


def time_pipelined(dispatch: Callable[[], object], wait: Callable[[object], object], *,
                   steps: int, batch_size: int) -> dict[str, float]:
  """Seconds per step, and images/s, with ``steps`` calls of ``dispatch`` made back to back
  and waited for once (``wait`` on the last one's result), as a training loop runs them: the
  device need not sit idle while the host prepares the next step, as between synchronised
  steps."""
  wait(dispatch())  # From an idle device.
  start = time.perf_counter()
  for _ in range(steps):
    last = dispatch()
  wait(last)
  per_step = (time.perf_counter() - start) / steps
  return {'pipelined_s': per_step, 'pipelined_images_per_s': batch_size / per_step}


def _compile(name: str, jitted, *args, profile_dir: str | None = None,
             compiler_options: Mapping[str, object] | None = None,
             ) -> tuple[jax.stages.Compiled, dict[str, float]]:
  """``jitted`` compiled for ``args``; the seconds spent tracing/lowering and in XLA, and the
  program's FLOPs. With ``profile_dir``, XLA's compile runs under the JAX profiler there."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  # A cold compile of the full model takes over a minute on a GPU: say what the wait is.
  logging.info('%s: lowered in %.1f s; XLA compiling it.', name, lower_s)
  compile_ = functools.partial(lowered.compile, compiler_options=compiler_options)
  compiled = _profiled(compile_, profile_dir) if profile_dir else compile_()
  compile_s = time.perf_counter() - start - lower_s
  logging.info('%s: compiled in %.1f s.', name, compile_s)
  return compiled, {'lower_s': lower_s, 'compile_s': compile_s, 'flops': _flops(lowered)}


def _profiled(run: Callable[[], T], profile_dir: str) -> T:
  """``run()`` under the JAX profiler, its trace in ``profile_dir``; a profiler that fails (it
  needs parts, CUPTI on a GPU, a machine may lack) costs the trace, not the measurement."""
  os.makedirs(profile_dir, exist_ok=True)
  try:
    jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
  except Exception:  # pylint: disable=broad-except
    logging.exception('The profiler did not start; measuring without it.')
    return run()
  try:
    return run()
  finally:
    try:
      jax.profiler.stop_trace()
    except Exception:  # pylint: disable=broad-except
      logging.exception('The profiler did not stop cleanly; its trace may be missing.')


def _flops(lowered: jax.stages.Lowered) -> float | None:
  """FLOPs of the program as lowered, before the backend's rewrites: a GPU's compiled program
  hands its convolutions to cuDNN as custom calls, which XLA's cost analysis leaves out (on an
  H100 it counted 80 of the 4,800 GFLOPs of the bf16 batch-32 train step). Backends behind
  the PJRT C API (JAX's CUDA plugin) do not analyse lowered programs, nor (with an error, from
  jax 0.12) those for a TPU slice described without its chips; XLA's CPU backend counts the
  same HLO for them."""
  try:
    analysis = lowered.cost_analysis()
  except jax.errors.JaxRuntimeError:  # "implemented for a PjRt-compatible backend only"
    analysis = None
  if analysis is None:
    try:
      from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
      analysis = _jax.hlo_module_cost_analysis(jax.local_devices(backend='cpu')[0].client,
                                               lowered.compiler_ir('hlo').as_hlo_module())
    except Exception:  # pylint: disable=broad-except
      # A private JAX API: without it the benchmark reports no FLOPs rather than failing.
      logging.exception('No FLOP count for this program.')
      return None
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _xla_buffer_bytes(compiled) -> int | None:
  """Arguments + outputs + temporaries that XLA allocates for the program (minus aliasing)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def peak_memory() -> tuple[int, str]:
  """(bytes, source): the device's peak where the backend reports it, else the process's RSS."""
  stats = jax.local_devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  # Linux reports ru_maxrss in KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process max RSS (CPU)'


def synthetic_source(num_examples: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """NYU-sized examples in the prepared datasets' format (uint8 images, float32 metres)."""
  rng = np.random.default_rng(seed)
  return [{'image': rng.integers(0, 256, (*NYU_FRAME, 3), np.uint8),
           'aif': rng.integers(0, 256, (*NYU_FRAME, 3), np.uint8),
           'depth': rng.uniform(0.5, 10, NYU_FRAME).astype(np.float32),
           'camera': defocus.CAMERAS['nyu'].as_dict()}
          for _ in range(num_examples)]


def benchmark_pipeline(config: ml_collections.ConfigDict, num_batches: int) -> dict:
  """Examples/s of `input_pipeline.train_iterator` alone (no model): in the rest of the first
  epoch, and in ``num_batches`` after it."""
  try:
    source = input_pipeline.data_source(config, config.dataset.train_split)
    name = f'{config.dataset.name} {config.dataset.train_split} (prepared)'
  except FileNotFoundError:
    source = synthetic_source(max(2 * config.batch_size, 16))
    name = (f'synthetic in-memory {len(source)} examples of {NYU_FRAME[0]}x{NYU_FRAME[1]} '
            '(no prepared dataset)')
  it = input_pipeline.train_iterator(config, source)
  next(it)  # Starts the threads and fills the prefetch buffer.
  # The rest of the first epoch reads every example (`input_pipeline.ResizedSource` keeps them);
  # the epochs after it are what training runs.
  first_epoch = len(source) // config.batch_size - 1
  timed = {}
  for part, batches in (('first_epoch_examples_per_s', first_epoch),
                        ('examples_per_s', num_batches)):
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    timed[part] = (batches * config.batch_size / (time.perf_counter() - start)
                   if batches > 0 else None)
  it.close()
  return {'source': name, **timed, 'num_threads': input_pipeline.preprocessing_threads(config),
          'num_workers': config.dataset.num_workers,
          'keep_resized_gb': config.dataset.get('keep_resized_gb', 0.0)}


def profile_steps(run: Callable[[], object], compiled: jax.stages.Compiled, profile_dir: str,
                  steps: int = 3) -> dict:
  """Traces ``steps`` calls of ``run`` with the JAX profiler into ``profile_dir`` (TensorBoard's
  profile tab and Perfetto read it), writes ``compiled``'s optimised HLO beside it, and sums the
  trace's time per device op (`device_op_times`)."""
  os.makedirs(profile_dir, exist_ok=True)
  with gzip.open(os.path.join(profile_dir, 'train_step.hlo.txt.gz'), 'wt') as f:
    f.write(compiled.as_text())
  _profiled(lambda: [run() for _ in range(steps)], profile_dir)
  trace = newest_trace(profile_dir)
  return {'trace': trace, **device_op_times(trace, steps)}


def newest_trace(profile_dir: str) -> str:
  """The Perfetto trace of the latest `jax.profiler.trace` into ``profile_dir``."""
  traces = glob.glob(os.path.join(profile_dir, 'plugins', 'profile', '*',
                                  'perfetto_trace.json.gz'))
  if not traces:
    raise FileNotFoundError(f'No profiler trace in {profile_dir} (the profiler did not run).')
  return max(traces, key=os.path.getmtime)


def _trace_events(trace: str) -> list[dict]:
  with gzip.open(trace, 'rt') as f:
    events = json.load(f)
  return events['traceEvents'] if isinstance(events, dict) else events


def compile_phase_times(trace: str, top: int = 80) -> list[dict]:
  """The ``top`` host events of a traced XLA compile by total time: its passes and phases as
  XLA names them (HLO passes, autotuning, code generation, PTX assembly), each summed over its
  calls. Nested events count in their parents too: the list says where time went, not a sum."""
  total_us, calls = collections.Counter(), collections.Counter()
  for e in _trace_events(trace):
    if e.get('ph') == 'X' and not e['name'].startswith('$'):  # '$': Python functions.
      total_us[e['name']] += e.get('dur', 0)
      calls[e['name']] += 1
  return [{'name': name, 'ms': us / 1e3, 'calls': calls[name]}
          for name, us in total_us.most_common(top)]


def device_op_times(trace: str, steps: int, top: int = 60) -> dict:
  """Per step, from a Perfetto trace: the busy time of each line (thread) of the device and the
  ``top`` ops by time. The device is the trace's '/device:...' processes with events (a GPU:
  its streams, and lines such as 'XLA Ops' that summarise the same time; libtpu, where
  installed, may add an empty '/device:CUSTOM:Megascale Trace'), else the host threads that
  XLA's CPU backend computes on."""
  events = _trace_events(trace)
  processes = {e['pid']: e['args'].get('name', '') for e in events
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  threads = {(e['pid'], e['tid']): e['args'].get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'thread_name'}
  with_events = {e.get('pid') for e in events if e.get('ph') == 'X'}
  device = {pid for pid, name in processes.items()
            if name.startswith('/device:') and pid in with_events}
  total_us, calls = collections.Counter(), collections.Counter()
  for e in events:
    line = threads.get((e.get('pid'), e.get('tid')), '')
    if e.get('ph') == 'X' and (e['pid'] in device if device else line.startswith('tf_XLA')):
      key = (f'{processes[e["pid"]]} {line}' if device else 'XLA CPU threads', e['name'])
      total_us[key] += e.get('dur', 0)
      calls[key] += 1
  busy_us = collections.Counter()
  for (line, _), us in total_us.items():
    busy_us[line] += us
  return {'busy_ms_per_step': {line: us / 1e3 / steps for line, us in busy_us.most_common()},
          'top_ops': [{'line': line, 'name': name, 'ms_per_step': us / 1e3 / steps,
                       'calls_per_step': calls[line, name] / steps}
                      for (line, name), us in total_us.most_common(top)]}


def benchmark_jax(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                  max_busy_cores: float, max_wait: float, rendering: bool = False,
                  profile_dir: str | None = None,
                  compile_profile_dir: str | None = None) -> dict:
  """Compiles and times the train step and the eval forward of ``config`` (and, with
  ``rendering`` or a camera in the config, rendering the inputs; with ``profile_dir``, traces a
  few train steps there: `profile_steps`; with ``compile_profile_dir``, the train step's XLA
  compile: `compile_phase_times`)."""
  n = config.batch_size
  batch = input_pipeline.random_batch(config)
  results = {'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
             'num_devices': jax.device_count(),
             'products_in': products_in(config.model, jax.devices()[0])}
  start = time.perf_counter()
  trainer = train_lib.Trainer(config, train_size=n)
  with jax.set_mesh(trainer.mesh):
    state = trainer.initial_state()
    device_batch = sharding.global_batch(batch, trainer.batch_sharding)
    # Building the model and its initial state: part of every start and restart.
    results['setup_s'] = time.perf_counter() - start

    train_step, train_compile = _compile('Train step', trainer.step_fn, state, device_batch,
                                         profile_dir=compile_profile_dir)
    if compile_profile_dir:
      try:
        results['compile_profile'] = compile_phase_times(newest_trace(compile_profile_dir))
      except Exception as e:  # pylint: disable=broad-except
        # As for profile_steps: the timings stand without it.
        logging.exception('Reading the compile profile failed.')
        results['compile_profile'] = {'error': f'{type(e).__name__}: {e}'}

    def dispatch_train():
      nonlocal state
      state, metrics = train_step(state, device_batch)
      return state, metrics

    run_train = lambda: jax.block_until_ready(dispatch_train())
    run_train()
    # What a (re)start costs to its first step: imports, setup, tracing, compiling (or reading
    # the compilation cache), the step.
    results['first_step_after_process_start_s'] = runtime.process_age_s()
    train_load = wait_for_quiet(max_busy_cores, max_wait)
    train_times = time_steps(run_train, steps=steps, warmup=warmup)
    train_times.update(time_pipelined(dispatch_train, jax.block_until_ready, steps=steps,
                                      batch_size=n))
    logging.info('Train step: %s (load %s).', train_times, train_load)
    if profile_dir:
      try:
        results['profile'] = profile_steps(run_train, train_step, profile_dir)
      except Exception as e:  # pylint: disable=broad-except
        # The profiler needs parts (CUPTI on a GPU) a machine may lack; the timings stand.
        logging.exception('Profiling failed.')
        results['profile'] = {'error': f'{type(e).__name__}: {e}'}
    if trainer.rendering or rendering:
      results['rendering'] = benchmark_rendering(
          config, trainer.batch_sharding, train_times['median_s'],
          step_renders=bool(trainer.rendering), steps=steps, warmup=warmup,
          max_busy_cores=max_busy_cores, max_wait=max_wait)

    forward, eval_args = eval_program(trainer, state, device_batch)
    eval_forward, eval_compile = _compile('Eval forward', forward, *eval_args)
    run_eval = lambda: jax.block_until_ready(eval_forward(*eval_args))
    eval_load = wait_for_quiet(max_busy_cores, max_wait)
    eval_times = time_steps(run_eval, steps=steps, warmup=warmup)

  peak = peak_bf16_flops(results['device'])
  peak = peak * jax.device_count() if peak else None

  def figures(compiled, compile_times, times, load):
    flops = compile_times['flops']
    per_s = flops / times['median_s'] if flops else None
    launches = ({'kernel_launches': lowering.kernel_launches(compiled.as_text())}
                if results['backend'] == 'gpu' else {})
    return {**compile_times, **times,
            'images_per_s': n / times['median_s'], 'flops_per_s': per_s,
            'share_of_bf16_peak': per_s / peak if per_s and peak else None,
            'xla_buffer_bytes': _xla_buffer_bytes(compiled), 'load': load, **launches}

  peak_bytes, peak_source = peak_memory()
  results.update({
      'train': figures(train_step, train_compile, train_times, train_load),
      'eval': figures(eval_forward, eval_compile, eval_times, eval_load),
      'peak_memory_bytes': peak_bytes, 'peak_memory_source': peak_source,
      'peak_memory_bytes_per_image': peak_bytes / n,
  })
  return results


def products_in(model_config: ml_collections.ConfigDict, device: jax.Device) -> str:
  """What the model's convolutions and matrix products compute in on ``device``: a float32
  model's are float32 on CPUs, on GPUs before Ampere and with
  ``model.matmul_precision='float32'``; XLA's default is TF32 on NVIDIA GPUs from Ampere
  (compute capability 8.0) on, unless NVIDIA_TF32_OVERRIDE=0, and bfloat16 on TPUs. The
  PyTorch mode to compare with follows ('float32' has TF32 off, 'tf32' is PyTorch's own default
  for convolutions)."""
  precision = models.matmul_precision(model_config)
  if model_config.dtype != 'float32':
    return model_config.dtype
  if precision == 'float32' or device.platform == 'cpu':
    return 'float32'
  if device.platform == 'tpu':
    return 'bfloat16, three passes' if precision == 'tensorfloat32' else 'bfloat16, one pass'
  try:
    ampere = float(getattr(device, 'compute_capability', '')) >= 8.0
  except ValueError:  # No CUDA device (ROCm names its GPUs 'gfx...').
    return 'unknown'
  tf32 = ampere and os.environ.get('NVIDIA_TF32_OVERRIDE') != '0'
  return 'tensorfloat32' if tf32 else 'float32'


def eval_program(trainer: train_lib.Trainer, state, batch) -> tuple[Callable, tuple]:
  """The jitted eval forward of ``trainer``'s model and its arguments for ``batch``."""
  graphdef = trainer.eval_graphdef
  forward = jax.jit(lambda params, batch_stats, images, camera: nnx.merge(
      graphdef, params, batch_stats)(images, camera=camera))
  return forward, (state.params, state.batch_stats, batch['image'], batch['camera'])


def lowered_op_counts(config: ml_collections.ConfigDict,
                      platforms: Sequence[str] = lowering.PLATFORMS) -> dict[str, dict]:
  """{'train' | 'eval': {platform: counts}}: the programs the benchmark times, lowered for
  each platform on this machine (`lowering.op_counts`; no device of that platform needed),
  each with the model built for that platform."""
  counts = {'train': {}, 'eval': {}}
  for platform in platforms:
    trainer = train_lib.Trainer(config, train_size=config.batch_size, platform=platform)
    with jax.set_mesh(trainer.mesh):
      state = trainer.abstract_state
      batch = sharding.global_batch(input_pipeline.random_batch(config), trainer.batch_sharding)
      forward, eval_args = eval_program(trainer, state, batch)
      counts['train'].update(lowering.op_counts(trainer.step_fn, state, batch,
                                                platforms=(platform,)))
      counts['eval'].update(lowering.op_counts(forward, *eval_args, platforms=(platform,)))
  return counts


def _batch_spec(config: ml_collections.ConfigDict,
                batch_sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes of `input_pipeline.random_batch`'s batch for ``config``, from one image's:
  a batch of thousands need not be made to be compiled for."""
  one = config.copy_and_resolve_references()
  one.batch_size = 1
  return {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype,
                                  sharding=batch_sharding)
          for k, v in input_pipeline.random_batch(one).items()}


def compiler_options_for(devices: Sequence[jax.Device]) -> dict[str, object]:
  """Options for compiling without running: GPU autotuning off (it times candidates on the
  device: most of a cold GPU compile, docs/performance.md), and for a GPU the settings
  `runtime.tune_for_platform` gives a GPU process, also where this one computes elsewhere."""
  options = {'xla_gpu_autotune_level': 0}
  if devices[0].platform == 'gpu':
    options.update(runtime.gpu_compiler_options())
  return options


def compile_for_devices(config: ml_collections.ConfigDict, target: DevicesNotHere) -> dict:
  """The train step and the eval forward of ``config`` compiled on this machine for devices it
  lacks (`devices_not_here`), with ``compiler_options_for``; nothing runs. Each program's
  seconds tracing and lowering and in XLA's compiler (on this host's cores: an accelerator
  VM's host has more), its FLOPs (the whole batch's), XLA's buffers on each device and the
  share of the device's memory they take; for a GPU, the calls its autotuner would time on
  the device (`lowering.autotuned_calls`), which this compile skips, the kernels one run
  launches (`lowering.kernel_launches`) and how XLA submits them, grouped into command buffers
  (`lowering.command_buffers`, from the thunk sequence XLA dumps as it compiles); for several
  devices, the collectives between them (`lowering.collectives`)."""
  devices = target.devices
  trainer = train_lib.Trainer(config, train_size=config.batch_size, devices=devices)
  device = devices[0]
  memory = target.memory_bytes
  results = {'target': target.target, 'platform': device.platform, 'device': device.device_kind,
             'num_devices': len(devices), 'memory_bytes': memory}
  batch = _batch_spec(config, trainer.batch_sharding)
  with jax.set_mesh(trainer.mesh):
    programs = {'train': (trainer.step_fn, (trainer.abstract_state, batch)),
                'eval': eval_program(trainer, trainer.abstract_state, batch)}
    for name, (jitted, args) in programs.items():
      with tempfile.TemporaryDirectory() as dump_dir:
        options = compiler_options_for(devices)
        if device.platform == 'gpu':
          options['xla_dump_to'] = dump_dir
        compiled, figures = _compile(f'{name} for {len(devices)} x {device.device_kind}',
                                     jitted, *args, compiler_options=options)
        thunk_sequences = glob.glob(
            os.path.join(dump_dir, '*.thunk_sequence_after_thunk_passes.txt'))
        if len(thunk_sequences) == 1:
          with open(thunk_sequences[0]) as f:
            figures['command_buffers'] = lowering.command_buffers(f.read())
      per_device = _xla_buffer_bytes(compiled)
      results[name] = {**figures, 'xla_buffer_bytes_per_device': per_device,
                       'share_of_memory': per_device / memory if per_device and memory else None}
      hlo_text = compiled.as_text()
      if device.platform == 'gpu':
        results[name]['autotuned'] = lowering.autotuned_calls(hlo_text)
        results[name]['kernel_launches'] = lowering.kernel_launches(hlo_text)
      if len(devices) > 1:
        results[name]['collectives'] = lowering.collectives(hlo_text)
  return results


def benchmark_rendering(config: ml_collections.ConfigDict, batch_sharding, train_step_s: float,
                        *, step_renders: bool, steps: int, warmup: int, max_busy_cores: float,
                        max_wait: float) -> dict:
  """The rendering of a batch's inputs timed alone, and what it adds to the train step without
  it (``overhead``; ``step_renders``: the timed step includes it)."""
  if not step_renders:
    config = config.copy_and_resolve_references()
    config.dataset.camera.focus_distance = RENDERING_FOCUS_RANGE
  rendering = input_pipeline.rendering(config)
  batch = sharding.global_batch(input_pipeline.random_batch(config), batch_sharding)
  render, compile_times = _compile('Rendering', jax.jit(lambda batch: rendering(batch)['image']),
                                   batch)
  load = wait_for_quiet(max_busy_cores, max_wait)
  times = time_steps(lambda: jax.block_until_ready(render(batch)), steps=steps, warmup=warmup)
  plain_step_s = train_step_s - times['median_s'] if step_renders else train_step_s
  return {**compile_times, **times, 'mode': rendering.mode,
          'sigma_tolerance': rendering.sigma_tolerance, 'scale': rendering.scale,
          'camera': config.dataset.camera.to_dict(), 'step_renders': step_renders,
          'overhead': times['median_s'] / max(plain_step_s, 1e-9), 'load': load}


# PyTorch precision modes timed per device: float32 is the authors' setting; on CUDA also TF32
# matmuls/convolutions and bf16 autocast, PyTorch's fast modes.
TORCH_MODES = {'cpu': ('float32',), 'cuda': ('float32', 'tf32', 'bfloat16')}


def benchmark_torch(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                    max_busy_cores: float, max_wait: float,
                    modes: Sequence[str] | None = None) -> dict:
  """The PyTorch reference on the same batch and device kind: an Adam step on the config's loss,
  and the eval forward, in each of ``modes`` (default: ``TORCH_MODES`` of the device)."""
  pytorch.load_triton_first()
  import torch  # pylint: disable=g-import-not-at-top
  from hded_jax.pytorch import reference  # pylint: disable=g-import-not-at-top

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device == 'cpu':
    torch.set_num_threads(os.cpu_count())
  else:
    torch.backends.cudnn.benchmark = True
  layout = torch.channels_last if device == 'cuda' else torch.contiguous_format
  arch = config.model
  model = reference.HDEDNet(
      tuple(arch.block_sizes), arch.growth_rate, arch.num_init_features, arch.bn_size,
      heads=tuple(arch.heads)).to(device, memory_format=layout)
  opt = config.optimizer
  optimizer = torch.optim.Adam(model.parameters(), lr=opt.learning_rate, betas=(opt.b1, opt.b2))
  batch = {k: torch.from_numpy(v).to(device)
           for k, v in input_pipeline.random_batch(config).items()}
  image = batch['image'].permute(0, 3, 1, 2).contiguous(memory_format=layout)
  targets = {'depth': batch['depth'],
             'aif': batch['aif'].permute(0, 3, 1, 2).contiguous(memory_format=layout)}
  sync = torch.cuda.synchronize if device == 'cuda' else lambda: None
  n = config.batch_size
  results = {'version': torch.__version__, 'device': device,
             'num_threads': torch.get_num_threads()}
  if unknown := sorted(set(modes or ()) - set(TORCH_MODES[device])):
    raise ValueError(f'PyTorch modes {unknown} are not timed on {device}; choose from '
                     f'{TORCH_MODES[device]}.')
  for mode in modes or TORCH_MODES[device]:
    if device == 'cuda':
      torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == 'tf32'
      torch.cuda.reset_peak_memory_stats()
    autocast = torch.autocast(device, torch.bfloat16, enabled=mode == 'bfloat16')

    def dispatch_train():
      model.train()
      optimizer.zero_grad(set_to_none=True)
      with autocast:
        loss = reference.loss(model(image), targets, config.loss)
      loss.backward()
      optimizer.step()

    def run_train():
      dispatch_train()
      sync()

    def run_eval():
      model.eval()
      with torch.inference_mode(), autocast:
        model(image)
      sync()

    train_load = wait_for_quiet(max_busy_cores, max_wait)
    train_times = time_steps(run_train, steps=steps, warmup=warmup)
    train_times.update(time_pipelined(dispatch_train, lambda _: sync(), steps=steps,
                                      batch_size=n))
    eval_load = wait_for_quiet(max_busy_cores, max_wait)
    eval_times = time_steps(run_eval, steps=steps, warmup=warmup)
    results[mode] = {
        'train': {**train_times, 'images_per_s': n / train_times['median_s'],
                  'load': train_load},
        'eval': {**eval_times, 'images_per_s': n / eval_times['median_s'], 'load': eval_load},
        'peak_memory_bytes': torch.cuda.max_memory_allocated() if device == 'cuda' else None}
  return results


def next_batch_to_try(buffer_bytes: Mapping[int, int | None], largest_fit: int | None,
                      smallest_refused: int | None, memory_bytes: int, unit: int,
                      tolerance: float = LARGEST_BATCH_TOLERANCE) -> int | None:
  """The largest-batch search's next batch (a multiple of ``unit``), or None where it ends.

  ``buffer_bytes``: XLA's buffers of each batch whose step compiled (the sizing batches' too);
  ``largest_fit``: the largest batch found to fit. Only refusals so far: where the smallest
  refusal's buffers are known (it compiled: on a GPU) and exceed the memory, the line through
  them and the largest sizing batch's, interpolated to ``tolerance`` below ``memory_bytes``
  (aiming below the limit: where the buffers grow faster than the line, as with remat on a GPU,
  a line aimed at the limit lands above it, try after try); else 10% below it.
  A fit and a refusal: halfway between them until they are ``tolerance`` apart. Only fits: the
  line through the buffers of the two largest extrapolated to ``memory_bytes`` (at most twice
  the batch), where that is more than ``tolerance`` above it: XLA's buffers grow less than in
  proportion to the batch on a TPU, so the line through the two sizing batches can stop short,
  and more on a GPU with remat, so it can overshoot far (docs/performance.md)."""
  if largest_fit is None:
    batch = smallest_refused * 0.9
    refused = buffer_bytes.get(smallest_refused)
    sizing = [b for b, used in buffer_bytes.items()
              if used is not None and b < smallest_refused and used <= memory_bytes]
    if refused is not None and refused > memory_bytes and sizing:
      low = max(sizing)
      batch = low + ((1 - tolerance) * memory_bytes - buffer_bytes[low]) * (
          smallest_refused - low) / (refused - buffer_bytes[low])
    batch = int(batch) // unit * unit
    return batch if unit <= batch < smallest_refused else None
  if smallest_refused is not None:
    if smallest_refused - largest_fit <= max(unit, tolerance * largest_fit):
      return None
    batch = (largest_fit + smallest_refused) // 2 // unit * unit
    return batch if largest_fit < batch < smallest_refused else None
  known = sorted(b for b, used in buffer_bytes.items() if used is not None and b <= largest_fit)
  if len(known) < 2 or known[-1] != largest_fit:
    return None
  below, top = known[-2:]
  per_image = (buffer_bytes[top] - buffer_bytes[below]) / (top - below)
  batch = 2 * top
  if per_image > 0:
    batch = min(batch, top + (memory_bytes - buffer_bytes[top]) / per_image)
  batch = int(batch) // unit * unit
  return batch if batch > largest_fit * (1 + tolerance) else None


def largest_batches(configs: Mapping[str, ml_collections.ConfigDict],
                    memory_bytes: int | None = None, tries: int = 4,
                    compile_threads: int | None = None,
                    target: DevicesNotHere | None = None,
                    on_progress: Callable[[dict[str, dict]], None] | None = None,
                    ) -> dict[str, dict]:
  """For each config, the largest global batch whose train step fits in ``memory_bytes``
  (default: the device's limit, `device_memory_bytes`, or ``target``'s). XLA's buffer sizes at
  two batch sizes give the bytes per image; the extrapolated batch (a multiple of the device
  count) is then run for one step, and ``tries`` steps in all search from there
  (`next_batch_to_try`; each result's ``tried``: batch, whether it fitted, XLA's buffers per
  device where it compiled).
  ``target``: devices that this machine lacks (`devices_not_here`): nothing runs, and a batch
  fits where its step compiles (XLA's TPU compiler refuses a program larger than the chip's
  memory) and XLA's buffers fit the memory (the GPU compiler does not check). The programs are
  compiled with XLA's GPU autotuning off (`compiler_options_for`): at a batch of hundreds it
  would time every candidate algorithm of every convolution on that batch. Training compiles
  with autotuning, whose algorithms may need more workspace than these: the batch found is an
  upper bound.
  Each program compiles in a thread while the next is lowered, ``compile_threads`` at once
  (default: all the sizing programs, then each round of the search's, one per config, on an
  accelerator, whose host has cores to spare and whose compile without autotuning is mostly
  XLA's one-threaded passes: not yet measured; one at a time on the CPU, whose compiler
  keeps its cores busy: on the 2-core VM side by side was no faster). The programs run one
  after the other. ``on_progress`` gets the results so far after each round of tries (a run
  stopped at a time limit keeps them)."""
  devices = target.devices if target else None
  device = devices[0] if devices else jax.local_devices()[0]
  if memory_bytes is None:
    memory_bytes = target.memory_bytes if target else device_memory_bytes(device)
    if memory_bytes is None:
      why = f'{device.platform} reports no memory limit'
      return {name: {'batch_size': None, 'why': why} for name in configs}
  unit = len(devices) if devices else jax.device_count()
  checked = 'compiled for devices not here' if devices else 'ran one step'

  def lowered_step(config, batch_size):
    """The train step at ``batch_size``, lowered, and what runs it once compiled (the batch
    goes to the devices only then: another program's batch would take their memory)."""
    config_b = config.copy_and_resolve_references()
    config_b.batch_size = batch_size
    trainer = train_lib.Trainer(config_b, train_size=batch_size, devices=devices)
    with jax.set_mesh(trainer.mesh):
      lowered = trainer.step_fn.lower(trainer.abstract_state,
                                      _batch_spec(config_b, trainer.batch_sharding))
    if devices:  # Devices that are not here: compiled is as far as it goes.
      return lowered, lambda compiled: None
    return lowered, lambda compiled: jax.block_until_ready(compiled(
        trainer.initial_state(),
        sharding.global_batch(input_pipeline.random_batch(config_b), trainer.batch_sharding)))

  def fits(name, batch_size, program, run):
    """Whether one step at ``batch_size`` runs (compiles within the memory, for devices that
    are not here) without running out of device memory, and XLA's buffers where it compiled."""
    logging.info('Largest batch (%s): trying batch %d.', name, batch_size)
    used = None
    try:
      compiled = program.result()
      used = _xla_buffer_bytes(compiled)
      if devices and used is not None and used > memory_bytes:
        logging.info('Largest batch (%s): batch %d does not fit: XLA\'s buffers take %.1f of '
                     '%.1f GiB.', name, batch_size, used / 2**30, memory_bytes / 2**30)
        return False, used
      run(compiled)
    except jax.errors.JaxRuntimeError as e:
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      logging.info('Largest batch (%s): batch %d does not fit: %s', name, batch_size,
                   str(e).splitlines()[0])
      return False, used
    return True, used

  small, large = unit, 4 * unit
  results, buffers = {}, {}
  if compile_threads is None:
    compile_threads = 1 if jax.default_backend() == 'cpu' else 2 * len(configs)
  with futures.ThreadPoolExecutor(compile_threads) as pool:
    # Each program compiles while the next is lowered (lowering holds Python's lock).
    def compiling(config, batch_size):
      lowered, run = lowered_step(config, batch_size)
      return pool.submit(lowered.compile, compiler_options=compiler_options_for(
          devices or jax.local_devices())), run

    logging.info('Largest batch (%s): compiling the train step at batches %d and %d.',
                 ', '.join(configs), small, large)
    sizing = {(name, size): compiling(config, size)[0]
              for name, config in configs.items() for size in (small, large)}
    to_try = {}
    for name in configs:
      buffers[name] = {size: _xla_buffer_bytes(sizing.pop((name, size)).result())
                       for size in (small, large)}
      per_image = (buffers[name][large] - buffers[name][small]) / (large - small)
      estimate = int((memory_bytes - (buffers[name][small] - per_image * small)) / per_image)
      results[name] = {'memory_bytes': memory_bytes, 'bytes_per_image': per_image,
                       'estimate': estimate // unit * unit, 'tried': [], 'batch_size': None,
                       'why': 'none fitted yet', 'smallest_refused': None,
                       'search_ended': False, 'checked': checked}
      # Each compile takes minutes for the full model on a TPU compiled here: say where it is.
      logging.info('Largest batch (%s): %.1f MiB per image, so about %d images.', name,
                   per_image / 2**20, results[name]['estimate'])
      if results[name]['estimate'] >= unit:
        to_try[name] = results[name]['estimate']
    for _ in range(tries):
      programs = {name: compiling(configs[name], batch_size)
                  for name, batch_size in to_try.items()}
      for name, batch_size in to_try.items():
        result = results[name]
        fit, buffers[name][batch_size] = fits(name, batch_size, *programs[name])
        result['tried'].append([batch_size, fit, buffers[name][batch_size]])
        if fit and batch_size > (result['batch_size'] or 0):
          result['batch_size'] = batch_size
          result.pop('why', None)
        elif not fit:
          result['smallest_refused'] = min(batch_size, result['smallest_refused'] or batch_size)
      del programs  # Their executables, freed before the next round compiles.
      to_try = {name: batch_size for name in to_try
                if (batch_size := next_batch_to_try(
                    buffers[name], results[name]['batch_size'],
                    results[name]['smallest_refused'], memory_bytes, unit)) is not None}
      for name, result in results.items():
        result['search_ended'] = name not in to_try
      if on_progress:
        on_progress(results)
  for result in results.values():
    if result['batch_size'] is None:
      result['why'] = f'no batch from {result["estimate"]} down fitted'
  return results


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 5, warmup: int = 2,
                  pipeline_batches: int = 20, with_torch: bool = False,
                  torch_modes: Sequence[str] | None = None, find_largest_batch: bool = False,
                  rendering: bool = False, op_counts: bool = False,
                  profile_dir: str | None = None, compile_profile_dir: str | None = None,
                  max_busy_cores: float = 0.5, max_wait: float = 180.0,
                  pipeline_only: bool = False, compile_for: str | None = None,
                  output: str | None = None) -> dict:
  """Every measurement for ``config`` (its batch_size, image_size and model.dtype) as a dict,
  also written to ``output`` as JSON if given: rewritten after each measurement, so a run that
  is stopped (a time limit on a lent machine) keeps what it measured. ``pipeline_only``: the
  input pipeline alone (is it faster than the step?), nothing compiled. ``compile_for``: the
  programs compiled on this machine for the TPU slice or GPU it names (`devices_not_here`,
  `compile_for_devices`; the largest batches too where asked), nothing run."""
  h, w = config.dataset.image_size
  results = {
      'config': {'model': config.model.to_dict(), 'optimizer': config.optimizer.to_dict(),
                 'image_size': [h, w], 'batch_size': config.batch_size,
                 'dtype': config.model.dtype},
      'machine': {'cpu_count': os.cpu_count(), 'jax': jax.__version__,
                  'device_kind': jax.devices()[0].device_kind,
                  'xla_flags': os.environ.get('XLA_FLAGS', '')},
  }

  def save():
    if output:
      with open(output, 'w') as f:
        json.dump(results, f, indent=2, default=str)

  def find_largest_batch_for(target=None):
    def save_found(found):
      results['largest_batch'] = found
      save()
    save_found(largest_batches(_with_and_without_remat(config), target=target,
                               on_progress=save_found))

  if pipeline_only:
    results['pipeline'] = benchmark_pipeline(config, pipeline_batches)
    save()
    return results
  if op_counts:
    results['lowered'] = lowered_op_counts(config)
    save()
  if compile_for:
    target = devices_not_here(compile_for)
    results['compiled_for'] = compile_for_devices(config, target)
    save()
    if find_largest_batch:
      find_largest_batch_for(target)
    return results
  timing = dict(steps=steps, warmup=warmup, max_busy_cores=max_busy_cores, max_wait=max_wait)
  results['jax'] = benchmark_jax(config, **timing, rendering=rendering, profile_dir=profile_dir,
                                 compile_profile_dir=compile_profile_dir)
  if results['jax']['backend'] == 'gpu':
    results['jax']['gpu_autotune_cache_entries'] = runtime.gpu_autotune_cache_entries()
  save()
  results['pipeline'] = benchmark_pipeline(config, pipeline_batches)
  save()
  if with_torch:
    results['torch'] = benchmark_torch(config, **timing, modes=torch_modes)
    modes = {k: v for k, v in results['torch'].items() if isinstance(v, dict)}
    best = max(modes, key=lambda m: modes[m]['train']['images_per_s'])
    results['jax_vs_torch'] = {
        'best_torch_mode': best,
        **{f'{what}_vs_{mode}': (results['jax'][what]['images_per_s']
                                 / modes[mode][what]['images_per_s'])
           for mode in modes for what in ('train', 'eval')},
        **{f'train_pipelined_vs_{mode}': (results['jax']['train']['pipelined_images_per_s']
                                          / modes[mode]['train']['pipelined_images_per_s'])
           for mode in modes}}
  if find_largest_batch:
    find_largest_batch_for()
  save()
  return results


def _with_and_without_remat(
    config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  configs = {}
  for name, remat in (('plain', False), ('remat', True)):
    configs[name] = config.copy_and_resolve_references()
    configs[name].model.remat = remat
  return configs


def format_table(results: Mapping) -> str:
  """A text table of the headline figures."""
  cfg = results['config']
  if 'compiled_for' in results:
    return '\n'.join(_compiled_for_rows(results) + _lowered_and_largest_rows(results))
  pipe = results['pipeline']
  first = (f', {pipe["first_epoch_examples_per_s"]:.1f} in the first'
           if pipe.get('first_epoch_examples_per_s') else '')
  pipeline = (f'input pipeline {pipe["examples_per_s"]:.1f} examples/s after the first epoch'
              f'{first} ({pipe["source"]}; {pipe["num_threads"]} threads, '
              f'{pipe["num_workers"]} worker processes)')
  if 'jax' not in results:  # pipeline_only
    return pipeline
  rows = [f'{cfg["image_size"][0]}x{cfg["image_size"][1]}, batch {cfg["batch_size"]}, '
          f'{results["jax"]["backend"]} ({results["jax"]["device"]}, '
          f'{results["machine"]["cpu_count"]} CPUs); convolutions and matrix products in '
          f'{results["jax"]["products_in"]}',
          f'{"":18}{"compile s":>10}{"step s":>9}{"images/s":>10}{"GFLOP":>9}{"GFLOP/s":>9}'
          f'{"other busy cores":>18}']
  def row(name, r):
    compile_s = f'{r["compile_s"]:10.1f}' if 'compile_s' in r else f'{"-":>10}'
    gflop = f'{r["flops"] / 1e9:9.1f}' if r.get('flops') else f'{"-":>9}'
    rate = f'{r["flops_per_s"] / 1e9:9.1f}' if r.get('flops_per_s') else f'{"-":>9}'
    return (f'{name:18}{compile_s}{r["median_s"]:9.3f}{r["images_per_s"]:10.2f}{gflop}{rate}'
            f'{r["load"]["other_busy_cores"]:18.2f}')
  jx = results['jax']
  rows += [row(f'jax {cfg["dtype"]} train', jx['train']),
           row(f'jax {cfg["dtype"]} eval', jx['eval'])]
  pipelined = [f'jax {jx["train"]["pipelined_images_per_s"]:.2f}']
  for mode, r in results.get('torch', {}).items():
    if isinstance(r, dict):
      rows += [row(f'torch {mode} train', r['train']), row(f'torch {mode} eval', r['eval'])]
      pipelined.append(f'torch {mode} {r["train"]["pipelined_images_per_s"]:.2f}')
  rows.append('train images/s with steps dispatched back to back: ' + ', '.join(pipelined))
  rows.append(f'peak memory {jx["peak_memory_bytes"] / 2**20:.0f} MiB '
              f'({jx["peak_memory_bytes_per_image"] / 2**20:.0f} MiB/image; '
              f'{jx["peak_memory_source"]}); XLA train buffers '
              f'{(jx["train"]["xla_buffer_bytes"] or 0) / 2**20:.0f} MiB')
  rows += _kernel_launch_rows(jx)
  if render := jx.get('rendering'):
    rows.append(f'rendering the inputs ({render["mode"]}, sigma_tolerance '
                f'{render["sigma_tolerance"]}): {render["median_s"]:.3f} s per batch, adds '
                f'{100 * render["overhead"]:.1f}% to the train step without it; compiled in '
                f'{render["compile_s"]:.1f} s')
  rows.append(pipeline)
  return '\n'.join(rows + _lowered_and_largest_rows(results))


def _compiled_for_rows(results: Mapping) -> list[str]:
  cfg, target = results['config'], results['compiled_for']
  gpu = target['platform'] == 'gpu'
  memory = (f'{target["memory_bytes"] / 1e9:.0f} GB each' if target['memory_bytes']
            else 'memory unknown')
  if gpu and target['memory_bytes']:
    memory = f'{memory}: JAX\'s share of the card'
  rows = [f'{cfg["image_size"][0]}x{cfg["image_size"][1]}, batch {cfg["batch_size"]}, '
          f'{cfg["dtype"]}, compiled for {target["target"]} ({target["num_devices"]} x '
          f'{target["device"]}, {memory}) on this machine ({results["machine"]["cpu_count"]} '
          f'CPUs){", GPU autotuning off" if gpu else ""}; nothing ran',
          f'{"":18}{"lower s":>9}{"compile s":>11}{"GFLOP":>9}{"MiB per device":>16}'
          f'{"share of memory":>17}']
  for name in ('train', 'eval'):
    r = target[name]
    gflop = f'{r["flops"] / 1e9:9.1f}' if r.get('flops') else f'{"-":>9}'
    share = f'{100 * r["share_of_memory"]:16.1f}%' if r['share_of_memory'] else f'{"-":>17}'
    rows.append(f'{name:18}{r["lower_s"]:9.1f}{r["compile_s"]:11.1f}{gflop}'
                f'{(r["xla_buffer_bytes_per_device"] or 0) / 2**20:16.0f}{share}')
  for name in ('train', 'eval'):
    if tuned := target[name].get('autotuned'):
      rows.append(f'{name} autotuned on a GPU: {tuned["cudnn_convolutions"]} cuDNN convolutions '
                  f'({tuned["distinct_cudnn_convolutions"]} distinct), {tuned["cublas_gemms"]} '
                  f'cuBLAS GEMMs ({tuned["distinct_cublas_gemms"]} distinct), '
                  f'{tuned["triton_fusions"]} Triton fusions')
  rows += _kernel_launch_rows(target)
  for name in ('train', 'eval'):
    if graphs := target[name].get('command_buffers'):
      buffers = graphs['command_buffers']
      rows.append(f'{name} submitted per run: {graphs["submissions"]} ({buffers} command '
                  f'buffer{"s" * (buffers != 1)} holding {graphs["in_command_buffers"]}; outside: '
                  + (', '.join(f'{count} {kind}' for kind, count in graphs['outside'].items())
                     or 'nothing') + ')')
  for name in ('train', 'eval'):
    if (collectives := target[name].get('collectives')) is not None:
      rows.append(f'{name} collectives between the devices: ' + (', '.join(
          f'{count} {kind}' for kind, count in collectives.items()) or 'none'))
  return rows


def _kernel_launch_rows(programs: Mapping) -> list[str]:
  """The kernel launches of ``programs``' train and eval, where counted (GPUs)."""
  return [f'{name} kernels launched per run: {launches["total"]} ({launches["fusions"]} '
          f'fusions, {launches["custom_calls"]} custom calls, {launches["copies"]} copies, '
          f'{launches["other"]} other)'
          for name in ('train', 'eval') if (launches := programs[name].get('kernel_launches'))]


def _lowered_and_largest_rows(results: Mapping) -> list[str]:
  rows = []
  for program, by_platform in results.get('lowered', {}).items():
    rows.append(f'{program} lowered: ' + '; '.join(
        f'{platform} {c["ops"]} ops, {c["convolutions"]} convolutions '
        f'({c["distinct_convolutions"]} distinct), {sum(c["custom_calls"].values())} custom calls'
        for platform, c in by_platform.items()))
  for name, r in results.get('largest_batch', {}).items():
    if r['batch_size'] is None:
      rows.append(f'largest batch ({name}): None ({r["why"]})')
      continue
    if r['smallest_refused']:
      bound = f'{r["smallest_refused"]} did not fit'
    elif r['search_ended']:
      bound = f'its buffers put the limit within {LARGEST_BATCH_TOLERANCE:.0%}'
    else:
      bound = 'a lower bound: the tries ran out'
    rows.append(f'largest batch ({name}): {r["batch_size"]} ({r["checked"]}; {bound})')
  return rows
