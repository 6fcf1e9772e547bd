"""How the benchmark measures a program on this machine: steps (synchronised and back to
back), XLA's compile, FLOPs and buffers, peak memory, and how busy other processes keep the
machine (it may be shared: each timed run first waits for quiet)."""

from collections.abc import Callable, Mapping
import functools
import os
import resource
import statistics
import time
from typing import TypeVar

from absl import logging
import jax

T = TypeVar('T')

# Dense bf16 peak FLOP/s of one device, by a substring of its device_kind (vendor datasheets;
# most specific first).
PEAK_BF16_FLOPS = (
    ('H100 PCIe', 756e12), ('H100', 989e12), ('H200', 989e12), ('A100', 312e12),
    ('L4', 121e12), ('TPU v4', 275e12), ('TPU v5 lite', 197e12), ('TPU v5', 459e12),
    ('TPU v6', 918e12),
)


def peak_bf16_flops(device_kind: str) -> float | None:
  return next((flops for kind, flops in PEAK_BF16_FLOPS if kind in device_kind), None)


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
  if load['other_busy_cores'] > max_busy_cores and max_wait > 0:
    logging.info('Other processes keep %.1f cores busy: waiting up to %.0f s for at most %.1f '
                 'before timing (--max_wait=0 times at once).', load['other_busy_cores'],
                 max_wait, max_busy_cores)
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


def timed_compile(name: str, jitted, *args, profile_dir: str | None = None,
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
  compiled = profiled(compile_, profile_dir) if profile_dir else compile_()
  compile_s = time.perf_counter() - start - lower_s
  logging.info('%s: compiled in %.1f s.', name, compile_s)
  return compiled, {'lower_s': lower_s, 'compile_s': compile_s, 'flops': program_flops(lowered)}


def profiled(run: Callable[[], T], profile_dir: str) -> T:
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


def program_flops(lowered: jax.stages.Lowered) -> float | None:
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


def xla_buffer_bytes(compiled) -> int | None:
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
