"""JAX profiler traces read back: where a few train steps spend their device time, op by op,
and where an XLA compile spends its time, pass by pass. TensorBoard's profile tab and Perfetto
read the same traces."""

import collections
from collections.abc import Callable
import glob
import gzip
import json
import os

import jax

from hded_jax.benchmarking import measure


def profile_steps(run: Callable[[], object], compiled: jax.stages.Compiled, profile_dir: str,
                  steps: int = 3) -> dict:
  """Traces ``steps`` calls of ``run`` with the JAX profiler into ``profile_dir`` (TensorBoard's
  profile tab and Perfetto read it), writes ``compiled``'s optimised HLO beside it, and sums the
  trace's time per device op (`device_op_times`)."""
  os.makedirs(profile_dir, exist_ok=True)
  with gzip.open(os.path.join(profile_dir, 'train_step.hlo.txt.gz'), 'wt') as f:
    f.write(compiled.as_text())
  measure.profiled(lambda: [run() for _ in range(steps)], profile_dir)
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
