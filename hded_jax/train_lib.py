"""Training: a jitted, data-parallel train step over a `jax.make_mesh` mesh, Orbax checkpoints
(resumed automatically), clu metrics and progress reports.

The same code runs on one CPU, on several (forced) CPU devices, a GPU, a TPU VM and several hosts:
the batch is sharded over the mesh's 'data' axis, parameters are replicated, and XLA inserts the
cross-device reductions (BatchNorm statistics are over the global batch).
"""

from collections.abc import Mapping
import functools
import math
import os
import signal
import threading

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
from flax import nnx
from flax import traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from hded_jax import checkpoints
from hded_jax import input_pipeline
from hded_jax import losses
from hded_jax import models

P = jax.sharding.PartitionSpec


class NonFiniteLossError(FloatingPointError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState


def make_mesh(mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over all devices of all processes."""
  num_devices = jax.device_count()
  model = mesh_config.model
  data = mesh_config.data if mesh_config.data > 0 else num_devices // model
  if data * model != num_devices:
    raise ValueError(f'mesh data={mesh_config.data} x model={model} does not cover the '
                     f'{num_devices} devices; set config.mesh.data=-1 to use them all.')
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P('data'))


def replicated(mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


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
  return tx


def split_model(model: nnx.Module):
  """(train graphdef, eval graphdef, params, batch_stats): mode lives in the graphdef."""
  model.train()
  train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return train_graphdef, eval_graphdef, params, batch_stats


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, graphdef, tx, schedule,
               loss_config, dropout_key) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Dropout keys derive from (seed, step): resuming reproduces them."""
  step_key = jax.random.fold_in(dropout_key, state.step)

  def loss_fn(params, batch_stats):
    # copy: BatchNorm updates its statistics in place, inside this (grad) trace.
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    outputs = model(batch['image'], rngs=nnx.Rngs(dropout=step_key))
    total, terms = losses.compute_loss(outputs, batch, loss_config)
    return total, (terms, nnx.state(model, nnx.BatchStat))

  (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step),
             **{f'loss/{k}': v for k, v in terms.items()}}
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, metrics


class Trainer:
  """Holds what a run needs: mesh, shardings, the jitted step and the checkpoint manager."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, train_size: int):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = make_mesh(config.mesh)
    self.num_steps = num_train_steps(config, train_size)
    self.schedule = learning_rate_schedule(config, train_size / config.batch_size)
    self.tx = make_optimizer(config, self.schedule)

    model = models.create_model(config.model, seed=config.seed)
    if config.init_from:
      from hded_jax import convert  # pylint: disable=g-import-not-at-top
      loaded = convert.init_from(model, config.init_from)
      logging.info('init_from=%s loaded %d tensors: %s', config.init_from, len(loaded),
                   ', '.join(loaded))
    self.graphdef, self.eval_graphdef, params, batch_stats = split_model(model)

    def initial_state(params, batch_stats):
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                        opt_state=self.tx.init(params))

    # One jitted program places the state: op-by-op, every parameter shape compiles its own
    # zeros for the optimizer moments.
    self.state_sharding = jax.tree.map(lambda _: replicated(self.mesh),
                                       jax.eval_shape(initial_state, params, batch_stats))
    self.initial_state = jax.jit(initial_state, out_shardings=self.state_sharding)(
        params, batch_stats)
    self.batch_sharding = batch_sharding(self.mesh)
    self.step_fn = jax.jit(
        functools.partial(train_step, graphdef=self.graphdef, tx=self.tx,
                          schedule=self.schedule, loss_config=config.loss,
                          dropout_key=jax.random.key(config.seed)),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated(self.mesh)),
        donate_argnums=0)
    self.ckpt = checkpoints.manager(os.path.join(self.workdir, 'checkpoints'),
                                    max_to_keep=config.max_checkpoints_to_keep)

  def save(self, state: TrainState, data_iter, *, wait: bool = False) -> None:
    step = int(state.step)
    model_state = nnx.merge_state(state.params, state.batch_stats).to_pure_dict()
    self.ckpt.save(step, args=ocp.args.Composite(**{
        checkpoints.MODEL: ocp.args.StandardSave(model_state),
        checkpoints.TRAIN: ocp.args.StandardSave({'step': state.step,
                                                  'opt_state': state.opt_state}),
        checkpoints.DATA: grain.checkpoint.CheckpointSave(data_iter),
        checkpoints.CONFIG: ocp.args.JsonSave(self.config.to_dict())}), force=True)
    if wait:
      self.ckpt.wait_until_finished()

  def restore_or_init(self, data_iter) -> TrainState:
    """The latest checkpoint's state (data iterator restored in place), else the initial one."""
    step = self.ckpt.latest_step()
    if step is None:
      return self.initial_state
    logging.info('Resuming from %s step %d.', self.ckpt.directory, step)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.initial_state)
    model_target = nnx.merge_state(abstract.params, abstract.batch_stats).to_pure_dict()
    restored = self.ckpt.restore(step, args=ocp.args.Composite(**{
        checkpoints.MODEL: ocp.args.StandardRestore(model_target),
        checkpoints.TRAIN: ocp.args.StandardRestore({'step': abstract.step,
                                                     'opt_state': abstract.opt_state}),
        checkpoints.DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
    model_state = nnx.merge_state(abstract.params, abstract.batch_stats)
    nnx.replace_by_pure_dict(model_state, restored[checkpoints.MODEL])
    params, batch_stats = nnx.split_state(model_state, nnx.Param, nnx.BatchStat)
    return TrainState(step=restored[checkpoints.TRAIN]['step'], params=params,
                      batch_stats=batch_stats,
                      opt_state=restored[checkpoints.TRAIN]['opt_state'])


class PreemptionHandler:
  """SIGTERM (cloud preemption) -> save a checkpoint at the next step and exit cleanly."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree; JAX's preemption service tells them when to stop.
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class MetricsBuffer:
  """Fetches each step's metrics once the next step is dispatched (no host stall) and stops
  training at the first non-finite loss, before anything saves that state."""

  def __init__(self):
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
    # A non-finite gradient makes the state it updates non-finite even when the loss is not.
    for key in ('loss', 'grad_norm'):
      if not math.isfinite(values[key]):
        raise NonFiniteLossError(
            f'{key} is {values[key]} at step {step}; training stopped. The last good checkpoint '
            'is kept. Lower config.optimizer.learning_rate or set '
            'config.optimizer.grad_clip_norm.')
    self._history.append(values)

  def pop_means(self) -> dict[str, float]:
    """Means since the last call, for logging."""
    self.flush()
    means = {k: float(np.mean([h[k] for h in self._history])) for k in self._history[0]}
    self._history = []
    return means


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains (resuming from ``workdir``'s latest checkpoint) until config's last step."""
  workdir = os.path.abspath(workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  source = input_pipeline.data_source(config, config.dataset.train_split)
  trainer = Trainer(config, workdir, len(source))
  data_iter = input_pipeline.train_iterator(config, source)
  state = trainer.restore_or_init(data_iter)
  first_step = int(state.step)
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
  if jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
  preemption = PreemptionHandler()
  metrics_buffer = MetricsBuffer()
  try:
    with jax.set_mesh(trainer.mesh):
      for step in range(first_step + 1, trainer.num_steps + 1):
        with jax.profiler.StepTraceAnnotation('train', step_num=step):
          batch = input_pipeline.global_batch(next(data_iter), trainer.batch_sharding)
          state, metrics = trainer.step_fn(state, batch)
        metrics_buffer.add(step, metrics)
        for hook in hooks:
          hook(step)
        is_last = step == trainer.num_steps
        if step % config.log_every_steps == 0 or is_last:
          writer.write_scalars(step, metrics_buffer.pop_means())
        stop = preemption.should_stop(step)
        if step % config.checkpoint_every_steps == 0 or is_last or stop:
          metrics_buffer.flush()
          with report_progress.timed('checkpoint'):
            trainer.save(state, data_iter, wait=stop or is_last)
        if stop:
          logging.warning('Preempted (SIGTERM): saved step %d, exiting.', step)
          break
  finally:
    preemption.close()
    trainer.ckpt.wait_until_finished()
    trainer.ckpt.close()
    writer.flush()
  return state

