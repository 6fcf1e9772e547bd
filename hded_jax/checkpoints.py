"""Orbax checkpoints: one directory per step holding the model, the training state, the data
position and the experiment config, so that eval and prediction need only the directory.

Items of a step (each a sub-directory written by Orbax, atomically: a step is visible only once
fully written, so a half-written checkpoint is never picked up):
  model   pure dict of the model's nnx state (parameters and BatchNorm statistics);
  train   optimizer state, step and RNG (training checkpoints only);
  data    the input iterator's position (training checkpoints only);
  config  the experiment config as JSON (`config.model` builds the network).
"""

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from hded_jax import models

MODEL, TRAIN, DATA, CONFIG = 'model', 'train', 'data', 'config'


def manager(directory: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager rooted at ``directory`` (made absolute: Orbax requires it)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if read_only and not os.path.isdir(directory):
    raise FileNotFoundError(
        f'No checkpoint directory at {directory}. Pass the directory a training run wrote '
        '(WORKDIR/checkpoints) or one made by `python -m hded_jax.convert`.')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def model_state(model: nnx.Module) -> dict:
  return nnx.state(model).to_pure_dict()


def save_model(directory: str, step: int, model: nnx.Module,
               config: ml_collections.ConfigDict) -> None:
  """Writes a model-only checkpoint (what `eval.py` and `predict.py` need)."""
  with manager(directory, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(model_state(model)),
        CONFIG: ocp.args.JsonSave(config.to_dict())}))
    mngr.wait_until_finished()


def restore_config(mngr: ocp.CheckpointManager, step: int) -> ml_collections.ConfigDict:
  restored = mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return ml_collections.ConfigDict(_lists_to_tuples(restored[CONFIG]))


def _lists_to_tuples(value):
  """JSON has no tuples; configs use tuples for every sequence (sizes, heads, epochs)."""
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def restore_model_into(mngr: ocp.CheckpointManager, step: int, model: nnx.Module,
                       sharding: jax.sharding.Sharding | None = None) -> None:
  """Restores the ``model`` item of ``step`` into ``model`` in place."""
  state = nnx.state(model)
  default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=sharding or getattr(x, 'sharding', None) or default),
      state.to_pure_dict())
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardRestore(target)}))[MODEL]
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)


def load_model(directory: str, step: int | None = None, sharding=None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """Builds the network a checkpoint directory describes and loads its weights.

  Returns (model in eval mode, experiment config, step). ``step`` defaults to the latest.
  """
  mngr = manager(directory, read_only=True)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{mngr.directory} holds no complete checkpoint.')
  config = restore_config(mngr, step)
  # Abstract: the weights come from the checkpoint, so skip the random init.
  model = nnx.eval_shape(lambda: models.create_model(config.model))
  restore_model_into(mngr, step, model, sharding)
  model.eval()
  mngr.close()
  return model, config, step
