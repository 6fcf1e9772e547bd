"""The largest batch whose train step fits in device memory, found in a few compiles and steps:
XLA's buffers at two small batches give the bytes per image, and the search narrows from the
batch they extrapolate to."""

from collections.abc import Callable, Mapping
from concurrent import futures

from absl import logging
import jax
import ml_collections

from hded_jax import runtime
from hded_jax import sharding
from hded_jax import train_lib
from hded_jax.benchmarking import batches
from hded_jax.benchmarking import compile_targets
from hded_jax.benchmarking import measure

# The search ends where the batch that fits is this close to the limit.
LARGEST_BATCH_TOLERANCE = 0.05


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
                    target: compile_targets.DevicesNotHere | None = None,
                    on_progress: Callable[[dict[str, dict]], None] | None = None,
                    ) -> dict[str, dict]:
  """For each config, the largest global batch whose train step fits in ``memory_bytes``
  (default: the device's limit, `measure.device_memory_bytes`, or ``target``'s). XLA's buffer
  sizes at two batch sizes give the bytes per image; the extrapolated batch (a multiple of the
  device count) is then run for one step, and ``tries`` steps in all search from there
  (`next_batch_to_try`; each result's ``tried``: batch, whether it fitted, XLA's buffers per
  device where it compiled).
  ``target``: devices that this machine lacks (`compile_targets.devices_not_here`): nothing
  runs, and a batch fits where its step compiles (XLA's TPU compiler refuses a program larger
  than the chip's memory) and XLA's buffers fit the memory (the GPU compiler does not check).
  The programs are compiled with XLA's GPU autotuning off
  (`compile_targets.compiler_options_for`): at a batch of hundreds it would time every candidate
  algorithm of every convolution on that batch. Training compiles with autotuning, whose
  algorithms may need more workspace than these: the batch found is an upper bound.
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
    memory_bytes = target.memory_bytes if target else measure.device_memory_bytes(device)
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
      lowered = trainer.step_fn.lower(
          trainer.abstract_state,
          batches.random_batch_spec(config_b, trainer.batch_sharding))
    if devices:  # Devices that are not here: compiled is as far as it goes.
      return lowered, lambda compiled: None
    return lowered, lambda compiled: jax.block_until_ready(compiled(
        trainer.initial_state(),
        sharding.global_batch(batches.random_batch(config_b), trainer.batch_sharding)))

  def fits(name, batch_size, program, run):
    """Whether one step at ``batch_size`` runs (compiles within the memory, for devices that
    are not here) without running out of device memory, and XLA's buffers where it compiled."""
    logging.info('Largest batch (%s): trying batch %d.', name, batch_size)
    used = None
    try:
      compiled = program.result()
      used = measure.xla_buffer_bytes(compiled)
      if devices and used is not None and used > memory_bytes:
        logging.info('Largest batch (%s): batch %d does not fit: XLA\'s buffers take %.1f of '
                     '%.1f GiB.', name, batch_size, used / 2**30, memory_bytes / 2**30)
        return False, used
      run(compiled)
    except jax.errors.JaxRuntimeError as e:
      if not runtime.is_out_of_memory(e):
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
      return pool.submit(lowered.compile, compiler_options=compile_targets.compiler_options_for(
          devices or jax.local_devices())), run

    logging.info('Largest batch (%s): compiling the train step at batches %d and %d.',
                 ', '.join(configs), small, large)
    sizing = {(name, size): compiling(config, size)[0]
              for name, config in configs.items() for size in (small, large)}
    to_try = {}
    for name in configs:
      buffers[name] = {size: measure.xla_buffer_bytes(sizing.pop((name, size)).result())
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
