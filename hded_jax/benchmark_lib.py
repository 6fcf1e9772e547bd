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
``with_torch`` also times the PyTorch reference on the same device (`torch_reference`): on a
CPU in float32 with all cores, on CUDA in float32 (TF32 off), TF32 and bf16 autocast, all
channels_last with cudnn.benchmark, so every ratio comes from one process on one device.
``find_largest_batch`` finds the largest batch whose train step fits in device memory
(`largest_batch`).
``profile_dir`` keeps a JAX profiler trace of a few train steps and the compiled train program,
and sums the trace's device time per op; ``compile_profile_dir`` one of the train step's XLA
compile, summed per compiler pass and phase (`traces`).
``op_counts`` lowers the train step and the eval forward for GPU and TPU on this machine and
records their op counts (`lowering`): what an accelerator would be asked to compile.
``compile_for`` compiles them for a TPU slice or a GPU that this machine lacks, with XLA's TPU or
GPU compiler (`compile_targets`, `compile_for_devices`): compile time, memory per device and,
for a GPU, the calls its autotuner would time, before renting the machine.

The machine may be shared: before each timed run the benchmark waits (up to ``--max_wait``
seconds) until other processes keep fewer than ``--max_busy_cores`` cores busy, and records that
figure and the 1-minute load average beside each result (`measure`). `table` prints the
headline figures.
"""

from collections.abc import Callable, Sequence
import glob
import json
import os
import tempfile
import time

from absl import logging
from flax import nnx
import jax
import ml_collections
import numpy as np

from hded_jax import defocus
from hded_jax import files
from hded_jax import input_pipeline
from hded_jax import lowering
from hded_jax import models
from hded_jax import runtime
from hded_jax import sharding
from hded_jax import train_lib
from hded_jax.benchmarking import batches
from hded_jax.benchmarking import compile_targets
from hded_jax.benchmarking import largest_batch
from hded_jax.benchmarking import measure
from hded_jax.benchmarking import torch_reference
from hded_jax.benchmarking import traces

# The NYU Depth v2 frame size; the synthetic pipeline source resizes from it like the real one.
NYU_FRAME = (480, 640)

# The focus distances rendered when the benchmark times rendering for a config without a camera.
RENDERING_FOCUS_RANGE = (1.5, 3.0)


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
  for part, count in (('first_epoch_examples_per_s', first_epoch),
                      ('examples_per_s', num_batches)):
    start = time.perf_counter()
    for _ in range(count):
      next(it)
    timed[part] = (count * config.batch_size / (time.perf_counter() - start)
                   if count > 0 else None)
  it.close()
  return {'source': name, **timed, 'num_threads': input_pipeline.preprocessing_threads(config),
          'num_workers': config.dataset.num_workers,
          'keep_resized_gb': config.dataset.get('keep_resized_gb', 0.0)}


def benchmark_jax(config: ml_collections.ConfigDict, *, steps: int, warmup: int,
                  max_busy_cores: float, max_wait: float, rendering: bool = False,
                  profile_dir: str | None = None,
                  compile_profile_dir: str | None = None) -> dict:
  """Compiles and times the train step and the eval forward of ``config`` (and, with
  ``rendering`` or a camera in the config, rendering the inputs; with ``profile_dir``, traces a
  few train steps there: `traces.profile_steps`; with ``compile_profile_dir``, the train step's
  XLA compile: `traces.compile_phase_times`)."""
  n = config.batch_size
  batch = batches.random_batch(config)
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

    train_step, train_compile = measure.timed_compile(
        'Train step', trainer.step_fn, state, device_batch, profile_dir=compile_profile_dir)
    if compile_profile_dir:
      try:
        results['compile_profile'] = traces.compile_phase_times(
            traces.newest_trace(compile_profile_dir))
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
    train_load = measure.wait_for_quiet(max_busy_cores, max_wait)
    train_times = measure.time_steps(run_train, steps=steps, warmup=warmup)
    train_times.update(measure.time_pipelined(dispatch_train, jax.block_until_ready, steps=steps,
                                      batch_size=n))
    logging.info('Train step: %s (load %s).', train_times, train_load)
    if profile_dir:
      try:
        results['profile'] = traces.profile_steps(run_train, train_step, profile_dir)
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
    eval_forward, eval_compile = measure.timed_compile('Eval forward', forward, *eval_args)
    run_eval = lambda: jax.block_until_ready(eval_forward(*eval_args))
    eval_load = measure.wait_for_quiet(max_busy_cores, max_wait)
    eval_times = measure.time_steps(run_eval, steps=steps, warmup=warmup)

  peak = measure.peak_bf16_flops(results['device'])
  peak = peak * jax.device_count() if peak else None

  def figures(compiled, compile_times, times, load):
    flops = compile_times['flops']
    per_s = flops / times['median_s'] if flops else None
    launches = ({'kernel_launches': lowering.kernel_launches(compiled.as_text())}
                if results['backend'] == 'gpu' else {})
    return {**compile_times, **times,
            'images_per_s': n / times['median_s'], 'flops_per_s': per_s,
            'share_of_bf16_peak': per_s / peak if per_s and peak else None,
            'xla_buffer_bytes': measure.xla_buffer_bytes(compiled), 'load': load, **launches}

  peak_bytes, peak_source = measure.peak_memory()
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
      batch = sharding.global_batch(batches.random_batch(config), trainer.batch_sharding)
      forward, eval_args = eval_program(trainer, state, batch)
      counts['train'].update(lowering.op_counts(trainer.step_fn, state, batch,
                                                platforms=(platform,)))
      counts['eval'].update(lowering.op_counts(forward, *eval_args, platforms=(platform,)))
  return counts


def compile_for_devices(config: ml_collections.ConfigDict,
                        target: compile_targets.DevicesNotHere) -> dict:
  """The train step and the eval forward of ``config`` compiled on this machine for devices it
  lacks (`compile_targets.devices_not_here`), with its ``compiler_options_for``; nothing runs.
  Each program's seconds tracing and lowering and in XLA's compiler (on this host's cores: an
  accelerator VM's host has more), its FLOPs (the whole batch's), XLA's buffers on each device
  and the share of the device's memory they take; for a GPU, the calls its autotuner would time
  on the device (`lowering.autotuned_calls`), which this compile skips, the kernels one run
  launches (`lowering.kernel_launches`) and how XLA submits them, grouped into command buffers
  (`lowering.command_buffers`, from the thunk sequence XLA dumps as it compiles); for several
  devices, the collectives between them (`lowering.collectives`)."""
  devices = target.devices
  trainer = train_lib.Trainer(config, train_size=config.batch_size, devices=devices)
  device = devices[0]
  memory = target.memory_bytes
  results = {'target': target.target, 'platform': device.platform, 'device': device.device_kind,
             'num_devices': len(devices), 'memory_bytes': memory}
  batch = batches.random_batch_spec(config, trainer.batch_sharding)
  with jax.set_mesh(trainer.mesh):
    programs = {'train': (trainer.step_fn, (trainer.abstract_state, batch)),
                'eval': eval_program(trainer, trainer.abstract_state, batch)}
    for name, (jitted, args) in programs.items():
      with tempfile.TemporaryDirectory() as dump_dir:
        options = compile_targets.compiler_options_for(devices)
        if device.platform == 'gpu':
          options['xla_dump_to'] = dump_dir
        compiled, figures = measure.timed_compile(
            f'{name} for {len(devices)} x {device.device_kind}', jitted, *args,
            compiler_options=options)
        thunk_sequences = glob.glob(
            os.path.join(dump_dir, '*.thunk_sequence_after_thunk_passes.txt'))
        if len(thunk_sequences) == 1:
          with open(thunk_sequences[0]) as f:
            figures['command_buffers'] = lowering.command_buffers(f.read())
      per_device = measure.xla_buffer_bytes(compiled)
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
  batch = sharding.global_batch(batches.random_batch(config), batch_sharding)
  render, compile_times = measure.timed_compile(
      'Rendering', jax.jit(lambda batch: rendering(batch)['image']), batch)
  load = measure.wait_for_quiet(max_busy_cores, max_wait)
  times = measure.time_steps(lambda: jax.block_until_ready(render(batch)), steps=steps,
                            warmup=warmup)
  plain_step_s = train_step_s - times['median_s'] if step_renders else train_step_s
  return {**compile_times, **times, 'mode': rendering.mode,
          'sigma_tolerance': rendering.sigma_tolerance, 'scale': rendering.scale,
          'camera': config.dataset.camera.to_dict(), 'step_renders': step_renders,
          'overhead': times['median_s'] / max(plain_step_s, 1e-9), 'load': load}


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
  programs compiled on this machine for the TPU slice or GPU it names
  (`compile_targets.devices_not_here`, `compile_for_devices`; the largest batches too where
  asked), nothing run."""
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
      with files.atomic_write(output) as f:  # A run stopped while writing keeps the last.
        json.dump(results, f, indent=2, default=str)

  def find_largest_batch_for(target=None):
    def save_found(found):
      results['largest_batch'] = found
      save()
    save_found(largest_batch.largest_batches(_with_and_without_remat(config), target=target,
                               on_progress=save_found))

  if pipeline_only:
    results['pipeline'] = benchmark_pipeline(config, pipeline_batches)
    save()
    return results
  if op_counts:
    results['lowered'] = lowered_op_counts(config)
    save()
  if compile_for:
    target = compile_targets.devices_not_here(compile_for)
    results['compiled_for'] = compile_for_devices(config, target)
    save()
    if find_largest_batch:
      find_largest_batch_for(target)
    return results
  settings = dict(steps=steps, warmup=warmup, max_busy_cores=max_busy_cores, max_wait=max_wait)
  results['jax'] = benchmark_jax(config, **settings, rendering=rendering, profile_dir=profile_dir,
                                 compile_profile_dir=compile_profile_dir)
  if results['jax']['backend'] == 'gpu':
    results['jax']['gpu_autotune_cache_entries'] = runtime.gpu_autotune_cache_entries()
  save()
  results['pipeline'] = benchmark_pipeline(config, pipeline_batches)
  save()
  if with_torch:
    results['torch'] = torch_reference.benchmark_torch(config, **settings, modes=torch_modes)
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
