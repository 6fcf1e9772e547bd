"""Training: a jitted, data-parallel train step over the mesh (`sharding.py`), Orbax checkpoints
(`checkpoints.py`, resumed automatically), clu metrics and progress reports.

The same code runs on one CPU, on several (forced) CPU devices, a GPU, a TPU VM and several hosts.
"""

from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
import functools
import math
import os
import signal
import threading
import time
import typing

from absl import logging
from clu import parameter_overview
from flax import nnx
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hded_jax import checkpoints
from hded_jax import defocus
from hded_jax import input_pipeline
from hded_jax import losses
from hded_jax import models
from hded_jax import program_cache
from hded_jax import runtime
from hded_jax import sharding
from hded_jax.train_state import TrainState

if typing.TYPE_CHECKING:
  from clu import metric_writers


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm became NaN or infinite."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Stops on sizes no run can have, naming the field (instead of a ZeroDivisionError or a shape
  error deep inside)."""
  problems = [f'config.{name}={config[name]}: must be at least 1' for name in (
      'batch_size', 'log_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep')
              if config[name] < 1]
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    problems.append(f'config.num_train_steps={config.num_train_steps} and '
                    f'config.num_epochs={config.num_epochs}: set one of them above 0')
  size = config.dataset.image_size
  size = tuple(size) if isinstance(size, (tuple, list)) else (size,)
  multiple = models.hded_net.INPUT_MULTIPLE
  if len(size) != 2 or min(size) < 1 or any(s % multiple for s in size):
    fix = ','.join(str(max(1, round(s / multiple)) * multiple) for s in (size * 2)[:2])
    problems.append(f'config.dataset.image_size={size}: give HEIGHT,WIDTH, each a positive '
                    f'multiple of {multiple} (the encoder halves it five times), e.g. '
                    f'--config.dataset.image_size={fix}')
  if problems:
    raise ValueError('Impossible config values:\n  ' + '\n  '.join(problems))


def num_train_steps(config: ml_collections.ConfigDict, train_size: int) -> int:
  if config.num_train_steps > 0:
    return config.num_train_steps
  return math.ceil(config.num_epochs * train_size / config.batch_size)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: float):
  opt = config.optimizer
  boundaries = {int(round(e * steps_per_epoch)): opt.decay_factor for e in opt.decay_epochs}
  return optax.piecewise_constant_schedule(opt.learning_rate, boundaries)


def make_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  opt = config.optimizer
  if opt.weight_decay:
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  else:
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  if opt.get('flatten', False):  # Configs saved before the field: per-parameter.
    tx = optax.flatten(tx)
  return tx


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, tx, schedule,
               loss_config, dropout_key, matmul_precision='default',
               rendering=None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Dropout keys derive from (seed, step): resuming reproduces them.

  ``matmul_precision``: the model's (`models.matmul_precision`), for its gradients.
  ``rendering`` (an `input_pipeline.Rendering`) renders the defocused inputs first.
  """
  step_key = jax.random.fold_in(dropout_key, state.step)
  if rendering is not None:
    batch = rendering(batch)

  def loss_fn(params, batch_stats):
    # copy: BatchNorm updates its statistics in place, inside this (grad) trace.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    outputs = model(batch['image'], camera=batch['camera'], rngs=nnx.Rngs(dropout=step_key))
    total, terms = losses.compute_loss(outputs, batch, loss_config)
    return total, (terms, nnx.state(model, nnx.BatchStat))

  with jax.default_matmul_precision(matmul_precision):
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': global_norm(grads),
             'learning_rate': schedule(state.step),
             **{f'loss/{k}': v for k, v in terms.items()}}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


def global_norm(tree) -> jax.Array:
  """The L2 norm of all leaves, as one reduction over their concatenation: `optax.global_norm`
  reduces each leaf apart, a kernel per parameter shape for XLA's compiler to build."""
  flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
  return jnp.sqrt(jnp.sum(jnp.square(flat)))


def _initial_state(params, batch_stats, *, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params))


def _abstract_train_state(model_config: ml_collections.ConfigDict, tx,
                          platform: str | None = None):
  """(train graphdef, eval graphdef, the train state's shapes and dtypes): nothing drawn."""
  graphdef, eval_graphdef, params, batch_stats = models.split_model(
      models.abstract_model(model_config, platform=platform))
  layout = jax.eval_shape(functools.partial(_initial_state, tx=tx), params, batch_stats)
  return graphdef, eval_graphdef, layout


# Config fields that only the training loop, evaluation or the input pipeline read: the train
# step's program is the same whatever their values, so the program cache's key leaves them out
# (a run resumed for more steps loads its step).
_NOT_IN_THE_STEP = frozenset((
    'num_epochs', 'num_train_steps', 'log_every_steps', 'profile_steps',
    'checkpoint_every_steps', 'max_checkpoints_to_keep', 'eval_batch_size', 'eval_num_images',
    'eval_num_examples', 'init_from', 'dataset.num_threads', 'dataset.prefetch',
    'dataset.num_workers', 'dataset.data_dir', 'dataset.auto_prepare', 'dataset.keep_resized_gb',
    'dataset.train_split', 'dataset.eval_split', 'dataset.hflip', 'dataset.color_jitter',
    'dataset.min_depth', 'dataset.max_depth', 'dataset.eval_protocol'))


def step_settings(config: ml_collections.ConfigDict, train_size: int) -> dict:
  """Everything the train step's program is built from besides the code and its arguments:
  the config less `_NOT_IN_THE_STEP`, and the training split's size (the schedule's epochs)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {'config': sorted((k, repr(v)) for k, v in flat.items() if k not in _NOT_IN_THE_STEP),
          'train_size': train_size}


def same_state_layout(config: ml_collections.ConfigDict, state: TrainState) -> bool:
  """Whether ``config`` trains a state of ``state``'s structure and shapes (nothing runs)."""
  tx = make_optimizer(config, learning_rate_schedule(config, steps_per_epoch=1.0))
  _, _, layout = _abstract_train_state(config.model, tx)
  return (jax.tree.structure(layout) == jax.tree.structure(state) and
          [x.shape for x in jax.tree.leaves(layout)] == [x.shape for x in jax.tree.leaves(state)])


class Trainer:
  """What a run computes with: the mesh, the state's layout on it and the jitted step. The
  state's values come from `initial_state` (a new run) or a checkpoint (restored into
  ``abstract_state``), so a resumed run never draws the initial weights."""

  def __init__(self, config: ml_collections.ConfigDict, train_size: int,
               platform: str | None = None, devices: Sequence[jax.Device] | None = None):
    """``platform``: the one the model's formulations are chosen for (``models.HDEDNet``);
    default the mesh's. Another one only to lower the step for it (``jax.export``).
    ``devices``: the mesh's (`sharding.make_mesh`); those of a TPU slice or GPU this machine
    lacks only to compile the step for them."""
    self.config = config
    self.train_size = train_size
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_splits(config.batch_size, self.mesh)
    self.platform = platform or self.mesh.devices.flat[0].platform
    self.num_steps = num_train_steps(config, train_size)
    self.schedule = learning_rate_schedule(config, train_size / config.batch_size)
    self.tx = make_optimizer(config, self.schedule)

    self.graphdef, self.eval_graphdef, layout = _abstract_train_state(
        config.model, self.tx, self.platform)
    self.abstract_state = sharding.abstract(layout, sharding.replicated(self.mesh))
    self.state_sharding = jax.tree.map(lambda x: x.sharding, self.abstract_state)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.rendering = input_pipeline.rendering(config)
    self.step_fn = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                          schedule=self.schedule, loss_config=config.loss,
                          dropout_key=jax.random.key(config.seed),
                          matmul_precision=models.matmul_precision(config.model),
                          rendering=self.rendering),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
        donate_argnums=0)

  def initial_state(self) -> TrainState:
    """A new run's state, placed on the mesh: the weights drawn from ``config.seed`` (then
    ``config.init_from``'s loaded over them) and the optimizer's initial state."""
    model = models.create_model(self.config.model, seed=self.config.seed,
                                platform=self.platform)
    if loaded := checkpoints.init_from(model, self.config.init_from):
      logging.info('init_from=%s loaded %d tensors: %s', self.config.init_from, len(loaded),
                   ', '.join(loaded))
    _, _, params, batch_stats = models.split_model(model)
    # One jitted program places the state: op-by-op, every parameter shape compiles its own
    # zeros for the optimizer moments.
    return jax.jit(functools.partial(_initial_state, tx=self.tx),
                   out_shardings=self.state_sharding)(params, batch_stats)

  def compile_step_in_background(self, batch_spec) -> tuple[futures.Future, bool]:
    """Starts making the step's program for ``batch_spec`` on another thread, so that a
    checkpoint restores meanwhile and the step's first call finds it ready. From the program
    cache (`program_cache`) where it holds this step: nothing traced. Otherwise lowered here
    and compiled (or read from JAX's compilation cache) there, where XLA holds no GIL, and
    kept in the program cache when XLA compiled it. Returns the future, whose result is the
    compiled step and the program cache's entry it was loaded from (None: compiled), or XLA's
    error; and whether it loads (else compiles)."""
    args = (self.abstract_state, batch_spec)
    cached = program_cache.cached_program(
        'train_step', args, **step_settings(self.config, self.train_size))
    loading = bool(cached and cached.exists())
    executor = futures.ThreadPoolExecutor(1, thread_name_prefix='compile_train_step')
    if loading:
      def load_or_compile():
        if program := cached.load():
          return program, cached
        return program_cache.compile_and_keep(self._lower(args), cached), None  # Unloadable.
      compiled = executor.submit(load_or_compile)
    else:
      compiled = executor.submit(
          lambda lowered: (program_cache.compile_and_keep(lowered, cached), None),
          self._lower(args))
    # Python still waits for the thread before it exits (after an error in the meantime too):
    # a process that exits while XLA compiles on another thread aborts.
    executor.shutdown(wait=False)
    return compiled, loading

  def _lower(self, args) -> jax.stages.Lowered:
    with jax.set_mesh(self.mesh):  # As the training loop calls the step.
      return self.step_fn.lower(*args)


class PreemptionHandler:
  """SIGTERM (cloud preemption) or Ctrl-C (SIGINT) -> save a checkpoint at the next step and
  exit cleanly. A second Ctrl-C stops at once, without saving.

  With several processes, all must save the same step: JAX's preemption service (started by
  ``jax.distributed``) catches SIGTERM in each process and has them agree on the step. SIGTERM
  keeps its handler (one of Python's would replace it, and no process would stop), and a
  Ctrl-C is passed on to it as a SIGTERM.
  """

  def __init__(self):
    self._event = threading.Event()
    self.received = None  # The signal's name, once one came.
    self._previous = {}
    self._processes = jax.process_count()
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if self._processes > 1 else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name
    self._event.set()
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
      logging.warning('Ctrl-C: saving a checkpoint after %s, then exiting (Ctrl-C again stops '
                      'at once, without saving).', 'this step' if self._processes == 1 else
                      f'a step that all {self._processes} processes agree on')
      if self._processes > 1:
        signal.raise_signal(signal.SIGTERM)

  def should_stop(self, step: int) -> bool:
    if self._processes > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


class StartupClock:
  """Where a start's seconds go until the first step ends: the parts that run one after another
  on the main thread, and XLA's compile (or cache read) beside them, for the first step's log
  line (a restart's cost, part by part)."""

  def __init__(self):
    self._last = time.perf_counter()
    age = runtime.process_age_s()
    self._parts = [('imports and set-up', age)] if age is not None else []
    self._compile = []  # [what, start, end] of the work on the other thread.
    self._compiling, self._waiting_for = None, None

  def lap(self, what: str) -> None:
    """The time since the last lap was spent on ``what``."""
    now = time.perf_counter()
    self._parts.append((what, now - self._last))
    self._last = now

  def time_compile(self, compiling: futures.Future, what: str, waiting_for: str) -> None:
    """``what`` happens on another thread until ``compiling`` is done; ``waiting_for`` names it
    in the log while the main thread waits for it."""
    self._compile = [what, time.perf_counter()]
    self._compiling, self._waiting_for = compiling, waiting_for
    compiling.add_done_callback(lambda _: self._compile.append(time.perf_counter()))

  def wait_for_compile(self, log_every_s: float = 30.0):
    """The compiling future's result (or XLA's error), logging every ``log_every_s`` until it is
    ready: a cold compile of the full model takes over a minute on a GPU, and nothing else shows."""
    while not self._compiling.done():
      logging.info('Waiting for %s: %.0f s so far.', self._waiting_for,
                   time.perf_counter() - self._compile[1])
      futures.wait([self._compiling], timeout=log_every_s)
    return self._compiling.result()

  def summary(self) -> str:
    parts = ', '.join(f'{what} {seconds:.1f} s' for what, seconds in self._parts)
    if len(self._compile) == 3:
      what, start, end = self._compile
      parts += f'; {what} in {end - start:.1f} s beside them'
    return parts


class MetricsBuffer:
  """Fetches each step's metrics once the next step is dispatched, so the host never waits for
  the device; ``check`` sees every step's values as they arrive."""

  def __init__(self, check: Callable[[int, Mapping[str, float]], None]):
    self._check = check
    self._pending = None
    self._history = []

  def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
    self.flush()
    self._pending = (step, metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, metrics = self._pending
    self._pending = None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self._check(step, values)
    self._history.append(values)

  def pop_means(self) -> dict[str, float]:
    """Means since the last call, for logging."""
    self.flush()
    means = {k: float(np.mean([h[k] for h in self._history])) for k in self._history[0]}
    self._history = []
    return means


class CameraLog:
  """The cameras training rendered with (``config.dataset.camera``), written as TensorBoard
  histograms (``camera/<field>``) at each logging step; this process's examples only."""

  def __init__(self):
    self._cameras = []

  def add(self, local_batch: Mapping[str, np.ndarray]) -> None:
    self._cameras.append(local_batch['camera'])

  def write(self, writer: 'metric_writers.MetricWriter', step: int) -> None:
    if self._cameras:
      cameras = np.concatenate(self._cameras)
      writer.write_histograms(step, {f'camera/{name}': cameras[:, i]
                                     for i, name in enumerate(defocus.CAMERA_FIELDS)})
    self._cameras = []


def check_finite(step: int, values: Mapping[str, float]) -> None:
  """Stops training at the first non-finite loss or gradient norm, before anything saves the
  state it produced (a non-finite gradient makes the state non-finite even when the loss is
  not)."""
  for key, what in (('loss', 'The loss'), ('grad_norm', 'The gradient norm')):
    if not math.isfinite(values[key]):
      raise NonFiniteError(
          f'{what} is {values[key]} at step {step}; training stopped. The last good checkpoint '
          'is kept. Lower config.optimizer.learning_rate or set '
          'config.optimizer.grad_clip_norm.')


def _resume(ckpt, trainer: Trainer, data_iter, config: ml_collections.ConfigDict,
            when_config_fits: Callable[[], None]) -> TrainState:
  """The newest saved state that restores and fits ``config``, or a new run's initial state.
  ``when_config_fits()`` runs once that is known, before any array is read or drawn."""
  if ckpt.latest_step() is None:
    checkpoints.check_init_from(config.init_from)  # Before the step compiles: up to minutes.
    when_config_fits()
    return trainer.initial_state()

  def check_config_fits(saved):
    # Rebuilding the saved layout takes seconds: only where it may differ.
    if (checkpoints.differing_settings(saved, config) and
        not same_state_layout(saved, trainer.abstract_state)):
      raise checkpoints.config_mismatch(str(ckpt.directory), saved, config)
    when_config_fits()

  step, state = checkpoints.restore_train_state(ckpt, trainer.abstract_state, data_iter,
                                                check_config_fits)
  logging.info('Resumed from %s step %d.', ckpt.directory, step)
  return state


def _first_step(program, state, batch, loaded_from: program_cache.CachedProgram | None,
                config: ml_collections.ConfigDict):
  """``program``'s first run, to its end. Where the device's memory is too small, the error
  says what to change. A program from the program cache that fails otherwise (an executable
  XLA did not serialise whole) is removed, and the error says to rerun: the donated state is
  gone, and the rerun compiles the step and resumes from the checkpoint."""
  try:
    state, metrics = program(state, batch)
    jax.block_until_ready(metrics)
  except jax.errors.JaxRuntimeError as error:
    if runtime.is_out_of_memory(error):
      raise MemoryError(
          f'The train step does not fit in device memory at config.batch_size='
          f'{config.batch_size} ({str(error).splitlines()[0]}). Lower the batch, set '
          "config.model.remat=True or config.model.dtype='bfloat16', or free the device (another "
          'process on it, e.g. an eval.py, holds memory too).') from None
    if loaded_from is None:
      raise
    loaded_from.remove()
    raise RuntimeError(
        f'The train step loaded from the program cache failed to run ({error}). It is removed '
        f'({loaded_from.path}): rerun the same command, which compiles the step and resumes '
        'from the newest checkpoint.') from error
  return state, metrics


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from ``workdir``'s newest checkpoint that restores) until config's last
  step."""
  check_config(config)
  workdir = runtime.local_path(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir={workdir} is a file: pass a directory (created if '
                             'missing).')
  checkpoints.check_shared(workdir)
  clock = StartupClock()
  source = input_pipeline.data_source(config, config.dataset.train_split)
  trainer = Trainer(config, len(source))
  # Saved with every checkpoint: evaluation reads the run's length from it.
  saved_config = config.copy_and_resolve_references()
  saved_config.num_train_steps = trainer.num_steps
  data_iter = input_pipeline.train_iterator(config, source)
  # Closing waits for the last save, also when an error ends the run.
  with checkpoints.manager(checkpoints.train_checkpoints_dir(workdir),
                           max_to_keep=config.max_checkpoints_to_keep) as ckpt:
    # XLA compiles the step (or reads it from the cache) while the state is restored or drawn,
    # from the moment the checkpoint's config is known to fit: a mismatch stops at once.
    compiling = []

    def compile_step():
      if not compiling:
        clock.lap('the dataset (built if missing), model and checkpoint config')
        compiling.append(trainer.compile_step_in_background(
            input_pipeline.batch_spec(config, source, trainer.batch_sharding)))
        future, loading = compiling[0]
        if loading:
          clock.lap('finding the step in the program cache')
          clock.time_compile(future, 'loaded the step from the program cache',
                             'the train step to load from the program cache')
        else:
          clock.lap('tracing and lowering the step')
          clock.time_compile(future, 'XLA compiled the step or read it from the cache',
                             "XLA's compile of the train step (kept in the workdir for "
                             'restarts)')

    # A rerun of a finished run compiles nothing (unless its final step fails to restore).
    finished = (ckpt.latest_step() or 0) >= trainer.num_steps
    state = _resume(ckpt, trainer, data_iter, config, (lambda: None) if finished else compile_step)
    first_step = int(state.step)
    if first_step >= trainer.num_steps:
      logging.info('%s holds step %d, and the run has %d steps: nothing to train (raise '
                   'config.num_train_steps or num_epochs to train on).', ckpt.directory,
                   first_step, trainer.num_steps)
      return state
    compile_step()
    clock.lap('restoring the checkpoint' if first_step else 'drawing the initial state')
    # clu's writers and periodic actions import TensorFlow (seconds): here, beside XLA's compile
    # or program load, rather than before the restore.
    writer = runtime.metric_writer(workdir)
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    clock.lap('the metric writer (importing TensorFlow)')
    # Called as it is: the jitted function would trace the step again.
    train_step_program, loaded_from = clock.wait_for_compile()  # Or XLA's error.
    clock.lap('waiting for XLA')
    logging.info('Mesh %s; %d training examples; %d steps (from %d); global batch %d.',
                 dict(trainer.mesh.shape), len(source), trainer.num_steps, first_step,
                 config.batch_size)
    if first_step == 0:
      logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
          state.params.to_pure_dict()))
      writer.write_hparams({
          k: v if isinstance(v, (int, float, str, bool)) else str(v)
          for k, v in traverse_util.flatten_dict(config.to_dict(), sep='.').items()})

    report_progress = periodic_actions.ReportProgress(
        num_train_steps=trainer.num_steps, writer=writer)
    hooks = [report_progress]
    if config.profile_steps and jax.process_index() == 0:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=workdir))
    metrics_buffer = MetricsBuffer(check_finite)
    camera_log = CameraLog() if trainer.rendering else None
    preemption = PreemptionHandler()  # Its signal handlers stay only until the finally below.
    try:
      with jax.set_mesh(trainer.mesh):
        for step in range(first_step + 1, trainer.num_steps + 1):
          with jax.profiler.StepTraceAnnotation('train', step_num=step):
            local_batch = next(data_iter)
            if camera_log:
              camera_log.add(local_batch)
            batch = sharding.global_batch(local_batch, trainer.batch_sharding)
            if step == first_step + 1:
              state, metrics = _first_step(train_step_program, state, batch, loaded_from,
                                           config)
            else:
              state, metrics = train_step_program(state, batch)
          metrics_buffer.add(step, metrics)
          if step == first_step + 1:
            clock.lap('the first batch and step')
            logging.info('Step %d done %.1f s after the process started: %s.', step,
                         runtime.process_age_s() or float('nan'), clock.summary())
          for hook in hooks:
            hook(step)
          is_last = step == trainer.num_steps
          if step % config.log_every_steps == 0 or is_last:
            writer.write_scalars(step, metrics_buffer.pop_means())
            if camera_log:
              camera_log.write(writer, step)
          stop = preemption.should_stop(step)
          if step % config.checkpoint_every_steps == 0 or is_last or stop:
            metrics_buffer.flush()
            with report_progress.timed('checkpoint'):
              checkpoints.save_train_state(ckpt, state, data_iter, saved_config,
                                           wait=stop or is_last)
          if stop:
            logging.warning('Stopped by %s: saved step %d, exiting.',
                            preemption.received or 'preemption', step)
            break
    finally:
      preemption.close()
      writer.flush()
  return state
