"""Every on-disk layout of hded-jax, written and read here only.

A training checkpoint, WORKDIR/checkpoints/<step>/ (Orbax; a step becomes visible only once fully
written, so a half-written one is never picked up), holds four items:
  model   pure dict of the model's nnx state (parameters and BatchNorm statistics);
  train   the optimizer state and the step;
  data    the input iterator's position (grain), so a resumed run continues the data order;
  config  the experiment config as JSON: `config.model` builds the network and
          `config.num_train_steps` is the run's length, resolved when training started.
A model checkpoint (`save_model`: converted official weights, WORKDIR/best_checkpoint/<step>/)
holds only `model` and `config`: all that evaluation and prediction read.
An ImageNet encoder init (`save_encoder_init`, for `config.init_from='imagenet:DIR'`) is
DIR/params/ (Orbax, the imported encoder tensors) and DIR/manifest.json.
"""

from collections.abc import Mapping, Sequence
import json
import os
import shutil

from flax import nnx
from flax import traverse_util
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from hded_jax import models
from hded_jax import sharding
from hded_jax.train_state import TrainState

MODEL, TRAIN, DATA, CONFIG = 'model', 'train', 'data', 'config'
IMAGENET_FORMAT = 'hded-jax imagenet encoder v1'
MANIFEST = 'manifest.json'
PARAMS = 'params'
_MAX_LISTED = 20

Path = tuple[str | int, ...]


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


# ---------------------------------------------------------------------------------------------
# Training checkpoints.


def save_train_state(mngr: ocp.CheckpointManager, state: TrainState, data_iter,
                     config: ml_collections.ConfigDict, *, wait: bool = False) -> None:
  model_state = nnx.merge_state(state.params, state.batch_stats).to_pure_dict()
  mngr.save(int(state.step), args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardSave(model_state),
      TRAIN: ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state}),
      DATA: grain.checkpoint.CheckpointSave(data_iter),
      CONFIG: ocp.args.JsonSave(config.to_dict())}), force=True)
  if wait:
    mngr.wait_until_finished()


def restore_train_state(mngr: ocp.CheckpointManager, step: int, like: TrainState,
                        data_iter) -> TrainState:
  """The state saved at ``step``, with the shapes and shardings of ``like``; the data iterator
  is restored in place."""
  target = sharding.abstract(like)
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardRestore(
          nnx.merge_state(target.params, target.batch_stats).to_pure_dict()),
      TRAIN: ocp.args.StandardRestore({'step': target.step, 'opt_state': target.opt_state}),
      DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
  model_state = nnx.merge_state(target.params, target.batch_stats)
  nnx.replace_by_pure_dict(model_state, restored[MODEL])
  params, batch_stats = nnx.split_state(model_state, nnx.Param, nnx.BatchStat)
  return TrainState(step=restored[TRAIN]['step'], params=params, batch_stats=batch_stats,
                    opt_state=restored[TRAIN]['opt_state'])


# ---------------------------------------------------------------------------------------------
# Model checkpoints: what evaluation and prediction read.


def save_model(directory: str, step: int, model: nnx.Module,
               config: ml_collections.ConfigDict) -> None:
  with manager(directory, async_save=False) as mngr:
    mngr.save(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(nnx.state(model).to_pure_dict()),
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
                       placement: jax.sharding.Sharding | None = None) -> None:
  """Restores the ``model`` item of ``step`` into ``model`` in place (placed with
  ``placement``, else where the model's arrays are)."""
  state = nnx.state(model)
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardRestore(sharding.abstract(state.to_pure_dict(), placement))}))
  nnx.replace_by_pure_dict(state, restored[MODEL])
  nnx.update(model, state)


def load_model(directory: str, step: int | None = None,
               placement: jax.sharding.Sharding | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """Builds the network a checkpoint directory describes and loads its weights.

  Returns (model in eval mode, experiment config, step). ``step`` defaults to the latest.
  """
  with manager(directory, read_only=True) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{mngr.directory} holds no complete checkpoint.')
    config = restore_config(mngr, step)
    # Abstract: the weights come from the checkpoint, so skip the random init.
    model = models.abstract_model(config.model)
    restore_model_into(mngr, step, model, placement)
  model.eval()
  return model, config, step


def save_best(checkpoint_dir: str, step: int, best_dir: str) -> None:
  """Copies the model and config of training checkpoint ``step`` to ``best_dir``/<step>/, a
  model checkpoint that replaces what ``best_dir`` held."""
  tmp_dir = best_dir + '.tmp'
  shutil.rmtree(tmp_dir, ignore_errors=True)
  shutil.copytree(os.path.join(checkpoint_dir, str(step)), os.path.join(tmp_dir, str(step)),
                  ignore=lambda _, names: [n for n in names if n in (TRAIN, DATA)])
  shutil.rmtree(best_dir, ignore_errors=True)
  os.replace(tmp_dir, best_dir)


# ---------------------------------------------------------------------------------------------
# Initialisation from other weights (`config.init_from`).


def path_name(path: Path) -> str:
  return '.'.join(str(p) for p in path)


def listing(title: str, items: Sequence[str]) -> str:
  """'title (n):' and the first items, one a line: for errors that list what is wrong."""
  shown = '\n  '.join(items[:_MAX_LISTED])
  more = f'\n  ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
  return f'{title} ({len(items)}):\n  {shown}{more}'


def save_encoder_init(out_dir: str, arrays: Mapping[Path, np.ndarray], manifest: dict) -> None:
  """Writes an ImageNet encoder init: ``arrays`` (hded-jax paths) and the manifest, last."""
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(out_dir, PARAMS), traverse_util.unflatten_dict(dict(arrays)))
  # Written last: a directory without a manifest is an interrupted conversion.
  with open(os.path.join(out_dir, MANIFEST), 'w') as f:
    json.dump({'format': IMAGENET_FORMAT, **manifest}, f, indent=1)


def load_encoder_init(model: nnx.Module, directory: str) -> list[str]:
  """Loads an ImageNet encoder init into ``model`` in place; returns the names loaded."""
  directory = os.path.abspath(os.path.expanduser(directory))
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
        f'{directory} has no {MANIFEST}: make it with `python -m hded_jax.convert imagenet '
        f'densenet121.pth {directory}` (an interrupted conversion leaves none; rerun it).')
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get('format') != IMAGENET_FORMAT:
    raise ValueError(f'{manifest_path}: format {manifest.get("format")!r}, expected '
                     f'{IMAGENET_FORMAT!r}.')
  state = nnx.state(model)
  flat = traverse_util.flatten_dict(state.to_pure_dict())
  by_name = {path_name(p): p for p in flat}
  mismatched = [
      f'{name}: saved {tuple(entry["shape"])}, model has '
      f'{tuple(flat[by_name[name]].shape) if name in by_name else "no such tensor"}'
      for name, entry in manifest['loaded'].items()
      if name not in by_name or tuple(flat[by_name[name]].shape) != tuple(entry['shape'])]
  if mismatched:
    raise ValueError(
        'The ImageNet weights are for the DenseNet-121 encoder (model_config("densenet121")); '
        f'this model differs.\n{listing("Mismatches", mismatched)}')
  target = traverse_util.unflatten_dict({
      by_name[name]: flat[by_name[name]] for name in manifest['loaded']})
  with ocp.StandardCheckpointer() as ckptr:
    restored = traverse_util.flatten_dict(
        ckptr.restore(os.path.join(directory, PARAMS), sharding.abstract(target)))
  flat.update(restored)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  return [path_name(p) for p in restored]


def load_checkpoint_weights(model: nnx.Module, directory: str) -> list[str]:
  """Loads all weights of the latest checkpoint in ``directory`` (same architecture)."""
  with manager(directory, read_only=True) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{mngr.directory} holds no complete checkpoint.')
    saved = restore_config(mngr, step).model
    flat_saved = traverse_util.flatten_dict(
        nnx.state(models.abstract_model(saved)).to_pure_dict())
    flat_model = traverse_util.flatten_dict(nnx.state(model).to_pure_dict())
    diff = sorted(path_name(p) for p in set(flat_saved) ^ set(flat_model)) + [
        f'{path_name(p)}: checkpoint {flat_saved[p].shape}, model {flat_model[p].shape}'
        for p in set(flat_saved) & set(flat_model) if flat_saved[p].shape != flat_model[p].shape]
    if diff:
      raise ValueError(
          f'The checkpoint in {mngr.directory} (step {step}) is a different architecture from '
          f'the model (checkpoint model config: {saved.to_dict()}).\n'
          + listing('Differences', sorted(diff)))
    restore_model_into(mngr, step, model)
  return [path_name(p) for p in flat_model]


INIT_FROM = {'imagenet': load_encoder_init, 'checkpoint': load_checkpoint_weights}


def init_from(model: nnx.Module, spec: str) -> list[str]:
  """Initialises ``model`` from ``'imagenet:DIR'`` or ``'checkpoint:DIR'``; '' does nothing.

  Returns the names of the tensors loaded (the rest keep their random init).
  """
  if not spec:
    return []
  kind, sep, directory = spec.partition(':')
  if not sep or kind not in INIT_FROM or not directory:
    raise ValueError(f'init_from={spec!r}: use "imagenet:DIR" (from `python -m hded_jax.convert '
                     'imagenet`), "checkpoint:DIR" (a hded-jax checkpoint directory) or "".')
  return INIT_FROM[kind](model, directory)
