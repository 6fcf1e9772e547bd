"""Every checkpoint layout of hded-jax, written and read here only.

A training checkpoint, WORKDIR/checkpoints/<step>/ (Orbax; a step becomes visible only once fully
written, so a half-written one is never picked up), holds four items:
  model   pure dict of the model's nnx state (parameters and BatchNorm statistics);
  train   the optimizer state and the step;
  data    the input iterator's position (grain), so a resumed run continues the data order;
  config  the experiment config as JSON: `config.model` builds the network and
          `config.num_train_steps` is the run's length, resolved when training started.
A model checkpoint (`save_model`: converted official weights, WORKDIR/best_checkpoint/<step>/)
holds only `model` and `config`: all that evaluation and prediction read.
Reading takes the newest step that restores: a damaged step (a truncated or deleted file) is
reported once and the next older one used; training moves damaged steps aside to
<step>.damaged, which Orbax does not list, so that it can write those steps again.
An ImageNet encoder init (`save_encoder_init`, for `config.init_from='imagenet:DIR'`) is
DIR/params/ (Orbax, the imported encoder tensors) and DIR/manifest.json.
"""

from collections.abc import Callable, Mapping, Sequence
import json
import os
import shutil
from typing import TypeVar

from absl import logging
from flax import nnx
from flax import traverse_util
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from hded_jax import files
from hded_jax import models
from hded_jax import runtime
from hded_jax import sharding
from hded_jax.train_state import TrainState

MODEL, TRAIN, DATA, CONFIG = 'model', 'train', 'data', 'config'
IMAGENET_FORMAT = 'hded-jax imagenet encoder v1'
MANIFEST = 'manifest.json'
PARAMS = 'params'
_MAX_LISTED = 20
_MAX_ERROR_CHARS = 400
DAMAGED_SUFFIX = '.damaged'
# In a training run's WORKDIR: its checkpoints, and the best of them that evaluation keeps.
TRAIN_CHECKPOINTS, BEST_CHECKPOINT = 'checkpoints', 'best_checkpoint'

Path = tuple[str | int, ...]
T = TypeVar('T')


class CheckpointError(RuntimeError):
  """No checkpoint step could be read (each step's error is in the message)."""


class ConfigMismatchError(ValueError):
  """The run's checkpoints hold a different model or optimizer than the config asks for."""


# Written by process 0 of a multi-process run, read back by every process (`check_shared`).
_SHARED_MARK = '.every_process_sees_this'


def check_shared(workdir: str) -> None:
  """Stops a multi-process run (several hosts) whose processes do not all see one ``workdir``
  (each host's own disk): Orbax writes each checkpoint from every process into one directory
  and every process restores it, so that run would fail at its first save, or resume on some
  hosts only. Process 0 writes a random token there; every process reads it back."""
  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(
      np.random.default_rng().integers(1, 2**31 - 1, dtype=np.int32)))
  mark = os.path.join(workdir, _SHARED_MARK)
  if jax.process_index() == 0:
    with files.atomic_write(mark) as f:
      f.write(str(token))
  multihost_utils.sync_global_devices('checkpoints.check_shared: written')
  try:
    with open(mark) as f:
      sees = f.read() == str(token)
  except OSError:
    sees = False
  seen = multihost_utils.process_allgather(np.array(sees))
  if jax.process_index() == 0:
    os.remove(mark)
  if not all(seen):
    blind = [i for i, s in enumerate(np.ravel(seen)) if not s]
    raise ValueError(
        f'--workdir={workdir} is not one directory for all {jax.process_count()} processes: '
        f'processes {blind} do not see what process 0 wrote there. Checkpoints are written by '
        'every process into one directory: use a directory every host mounts (NFS, Filestore, '
        'a Cloud Storage FUSE mount).')


def manager(directory: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager rooted at ``directory`` (made absolute: Orbax requires it)."""
  directory = runtime.local_path(directory)
  if read_only and not os.path.isdir(directory):
    raise FileNotFoundError(
        f'No checkpoint directory at {directory}. Pass the directory a training run wrote '
        '(WORKDIR/checkpoints) or one made by `python -m hded_jax.convert`.')
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, create=not read_only, read_only=read_only,
      save_interval_steps=0 if read_only else 1, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options)


def locate(path: str) -> tuple[str, int | None]:
  """(checkpoint directory, step or None for the newest) that ``path`` names: a training run's
  WORKDIR, a checkpoint directory (WORKDIR/checkpoints, WORKDIR/best_checkpoint, a converted
  model) or one step of one (DIR/<step>)."""
  path = runtime.local_path(path)
  expected = ('expected a training run\'s WORKDIR (with checkpoints/<step>/), a checkpoint '
              'directory (WORKDIR/checkpoints, WORKDIR/best_checkpoint, the output of `python -m '
              'hded_jax.convert official`) or one step of one (DIR/<step>)')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: {expected}.')
  if not os.path.isdir(path):
    raise NotADirectoryError(f'{path} is a file: {expected}.')
  if os.path.isdir(train_checkpoints_dir(path)):
    path = train_checkpoints_dir(path)
  if is_step(path):
    return os.path.dirname(path), int(os.path.basename(path))
  if has_steps(path):
    return path, None
  entries = sorted(os.listdir(path))
  found = listing('It holds', entries) if entries else 'It is empty'
  raise FileNotFoundError(f'No checkpoint in {path}: {expected}. {found}.')


def train_checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, TRAIN_CHECKPOINTS)


def best_checkpoint_dir(checkpoint_dir: str) -> str | None:
  """Where evaluation keeps the best step of ``checkpoint_dir``: WORKDIR/best_checkpoint for a
  training run's checkpoints, else None (a model checkpoint: converted, or a best one)."""
  if os.path.basename(os.path.normpath(checkpoint_dir)) != TRAIN_CHECKPOINTS:
    return None
  return os.path.join(os.path.dirname(os.path.normpath(checkpoint_dir)), BEST_CHECKPOINT)


def is_step(path: str) -> bool:
  """Whether ``path`` is one step of a checkpoint directory (DIR/<step>, holding its model)."""
  return os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, MODEL))


def has_steps(directory: str) -> bool:
  """Whether ``directory`` holds a complete step (Orbax gives a step its number as its name
  once it is fully written)."""
  return any(n.isdigit() and os.path.isdir(os.path.join(directory, n))
             for n in os.listdir(directory))


def _error_summary(error: BaseException) -> str:
  """The innermost cause, one line: Orbax wraps TensorStore's errors in pages of specs."""
  while error.__cause__ is not None:
    error = error.__cause__
  # TensorStore appends its whole spec to the message.
  text = str(error).strip().split('\n')[0].split(' [tensorstore_spec')[0]
  if len(text) > _MAX_ERROR_CHARS:
    text = text[:_MAX_ERROR_CHARS] + ' ...'
  return f'{type(error).__name__}: {text}'


def damage_report(mngr: ocp.CheckpointManager, step: int, error: BaseException) -> str:
  return f'step {step} ({os.path.join(mngr.directory, str(step))}) does not restore: ' + (
      _error_summary(error))


def restore_newest(mngr: ocp.CheckpointManager, restore: Callable[[int], T], *,
                   step: int | None = None, set_aside_damaged: bool = False) -> tuple[int, T]:
  """(step, ``restore(step)``) for the newest step that restores, or for ``step`` if given.

  Each newer step that fails is reported in one warning naming the step, its path and the
  error; with ``set_aside_damaged`` (training, which will write those steps again) it is renamed
  to <step>.damaged. A ConfigMismatchError is no damage and stops at once; CheckpointError when
  no step restores.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'{mngr.directory} holds no complete checkpoint.')
  damaged = []
  for candidate in steps:
    try:
      result = restore(candidate)
    except ConfigMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any damage: Orbax, TensorStore, JSON)
      logging.debug('Restoring step %d failed:', candidate, exc_info=e)  # --verbosity=1
      if step is not None or jax.process_count() > 1:
        # Processes cannot agree on a fallback without a barrier Orbax might be waiting in.
        raise CheckpointError(damage_report(mngr, candidate, e) + (
            '. Move that step aside (e.g. to <step>.damaged) and rerun to use an older one.'
            if step is None else
            f'. Pass {mngr.directory} instead to use its newest step that restores.')) from None
      damaged.append((candidate, e))
      continue
    for bad, error in damaged:
      note = f'; moved it to {_set_aside(mngr, bad)}' if set_aside_damaged else ''
      logging.warning('Checkpoint %s; using step %d instead%s.',
                      damage_report(mngr, bad, error), candidate, note)
    return candidate, result
  raise CheckpointError(
      f'No checkpoint in {mngr.directory} restores (an interrupted copy? a full disk?). ' +
      listing('Steps tried', [damage_report(mngr, s, e) for s, e in damaged]) +
      (f'\nTo train afresh, move {mngr.directory} aside.' if set_aside_damaged else
       '\nCopy the checkpoints again, or pass another checkpoint.'))


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  source = os.path.join(mngr.directory, str(step))
  target = source + DAMAGED_SUFFIX
  n = 1
  while os.path.exists(target):
    n += 1
    target = f'{source}{DAMAGED_SUFFIX}.{n}'
  os.rename(source, target)
  mngr.reload()
  return target


# ---------------------------------------------------------------------------------------------
# Training checkpoints.


def save_train_state(mngr: ocp.CheckpointManager, state: TrainState, data_iter,
                     config: ml_collections.ConfigDict, *, wait: bool = False) -> None:
  """Saves in the background (``wait``: to the end). A save that fails, this one or the
  previous one still writing, raises CheckpointError in one line (Orbax's is pages of
  traceback; ``--verbosity=1`` logs it)."""
  model_state = nnx.merge_state(state.params, state.batch_stats).to_pure_dict()
  try:
    mngr.save(int(state.step), args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardSave(model_state),
        TRAIN: ocp.args.StandardSave({'step': state.step, 'opt_state': state.opt_state}),
        DATA: grain.checkpoint.CheckpointSave(data_iter),
        CONFIG: ocp.args.JsonSave(config.to_dict())}), force=True)
    if wait:
      mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except  (Orbax's, TensorStore's, the disk's)
    logging.debug('Saving a checkpoint failed:', exc_info=e)
    latest = mngr.latest_step()
    raise CheckpointError(
        f'A checkpoint could not be written to {mngr.directory}: {_error_summary(e)}. Free '
        'space or fix the folder, then rerun: training ' + (
            f'resumes from the newest complete step ({latest}).' if latest is not None
            else 'starts afresh (no step is complete).')) from None


def restore_train_state(
    mngr: ocp.CheckpointManager, like: TrainState, data_iter,
    check_config: Callable[[ml_collections.ConfigDict], None]) -> tuple[int, TrainState]:
  """(step, state) of the newest step that restores, with the shapes and shardings of ``like``;
  the data iterator is restored in place. Damaged newer steps are set aside.

  ``check_config(saved config)`` runs before anything else is read and raises
  ConfigMismatchError when the saved state does not fit ``like`` (see ``config_mismatch``).
  """
  target = sharding.abstract(like)

  def restore(step):
    check_config(restore_config(mngr, step))
    model_state = nnx.merge_state(target.params, target.batch_stats)
    model_target = model_state.to_pure_dict()
    train_target = {'step': target.step, 'opt_state': target.opt_state}
    restored = mngr.restore(step, args=ocp.args.Composite(**{
        MODEL: ocp.args.StandardRestore(_on_host(model_target)),
        TRAIN: ocp.args.StandardRestore(_on_host(train_target)),
        DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
    nnx.replace_by_pure_dict(model_state, _placed(restored[MODEL], model_target))
    params, batch_stats = nnx.split_state(model_state, nnx.Param, nnx.BatchStat)
    train = _placed(restored[TRAIN], train_target)
    return TrainState(step=train['step'], params=params, batch_stats=batch_stats,
                      opt_state=train['opt_state'])

  return restore_newest(mngr, restore, set_aside_damaged=True)


def differing_settings(saved: ml_collections.ConfigDict,
                       config: ml_collections.ConfigDict) -> list[str]:
  """The model and optimizer fields (what the train state's layout follows from) whose values
  differ, one 'section.field: saved X, now Y' line each."""
  def fields(c, section):
    part = c.get(section)
    return traverse_util.flatten_dict(part.to_dict(), sep='.') if part is not None else {}

  differing = []
  for section in ('model', 'optimizer'):
    old, new = fields(saved, section), fields(config, section)
    differing += [f'{section}.{k}: saved {old.get(k, "(none)")!r}, now {new.get(k, "(none)")!r}'
                  for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  return differing


def config_mismatch(directory: str, saved: ml_collections.ConfigDict,
                    config: ml_collections.ConfigDict) -> ConfigMismatchError:
  """The error for resuming with a model or optimizer other than the saved one: the fields that
  differ and the ways out."""
  differing = differing_settings(saved, config)
  model_same = not any(d.startswith('model.') for d in differing)
  start_from = (f' and add --config.init_from=checkpoint:{directory} to start from its weights'
                if model_same else '')
  return ConfigMismatchError(
      f'{directory} holds a run with another model or optimizer than this config, so it cannot '
      'resume.\n' + (listing('Fields that differ', differing) if differing else
                      'The saved arrays differ in shape from the ones this config builds.') +
      '\nEither rerun with the saved values (drop the overrides that changed them; '
      f'the saved config is in every step\'s {CONFIG}/ item), or train in a new --workdir'
      f'{start_from}.')


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


def restore_model_into(mngr: ocp.CheckpointManager, step: int, model: nnx.Module) -> None:
  """Restores the ``model`` item of ``step`` into ``model`` in place, where its arrays are."""
  state = nnx.state(model)
  target = sharding.abstract(state.to_pure_dict())
  restored = mngr.restore(step, args=ocp.args.Composite(**{
      MODEL: ocp.args.StandardRestore(_on_host(target))}))
  nnx.replace_by_pure_dict(state, _placed(restored[MODEL], target))
  nnx.update(model, state)


def _on_host(target):
  """``target`` (ShapeDtypeStructs) as zero-strided numpy arrays: a restore target that Orbax
  reads into host memory, for `_placed`: Orbax would make each device array apart, which for
  the full train state's 1,598 arrays takes longer than placing them in one pass."""
  return jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), target)


def _placed(host_arrays, target):
  """``host_arrays`` placed as ``target``'s ShapeDtypeStructs say: on every process, each
  device's part of each array."""
  return jax.tree.map(lambda x, like: jax.make_array_from_callback(
      like.shape, like.sharding, lambda index: x[index]), host_arrays, target)


def restore_model(mngr: ocp.CheckpointManager, step: int | None = None
                  ) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """(model in eval mode, experiment config, step) of ``step``, else of the newest step that
  restores. The network is built from the config saved with it."""

  def restore(step):
    config = restore_config(mngr, step)
    # Abstract: the weights come from the checkpoint, so skip the random init.
    model = models.abstract_model(config.model)
    restore_model_into(mngr, step, model)
    return model, config

  step, (model, config) = restore_newest(mngr, restore, step=step)
  model.eval()
  return model, config, step


def load_model(path: str) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
  """``restore_model`` for what ``path`` names (see ``locate``): a step, else the newest that
  restores."""
  directory, step = locate(path)
  with manager(directory, read_only=True) as mngr:
    return restore_model(mngr, step)


BEST_OLD_SUFFIX, BEST_NEW_SUFFIX = '.old', '.tmp'


def save_best(best_dir: str, step: int, model: nnx.Module,
              config: ml_collections.ConfigDict) -> None:
  """Writes ``model`` (as restored from training step ``step``) and ``config`` to
  ``best_dir``/<step>/, a model checkpoint that replaces what ``best_dir`` held. From memory,
  not copied from the step, which training may delete meanwhile (``max_checkpoints_to_keep``).

  The old copy is renamed away before the new one is renamed in and deleted after; a process
  killed in between leaves both, and ``recover_best`` puts the old one back.
  """
  recover_best(best_dir)
  new_dir, old_dir = best_dir + BEST_NEW_SUFFIX, best_dir + BEST_OLD_SUFFIX
  save_model(new_dir, step, model, config)
  if os.path.exists(best_dir):
    os.replace(best_dir, old_dir)
  os.replace(new_dir, best_dir)
  shutil.rmtree(old_dir, ignore_errors=True)


def recover_best(best_dir: str) -> None:
  """Finishes or undoes a ``save_best`` that was killed: ``best_dir`` is complete afterwards
  (the old copy if the new one was not in place yet) and no partial copy is left."""
  old_dir = best_dir + BEST_OLD_SUFFIX
  if os.path.exists(old_dir):
    if os.path.exists(best_dir):
      shutil.rmtree(old_dir)
    else:
      os.replace(old_dir, best_dir)
      logging.warning('Restored %s from %s (an earlier copy was interrupted).', best_dir,
                      old_dir)
  shutil.rmtree(best_dir + BEST_NEW_SUFFIX, ignore_errors=True)


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
  directory = runtime.local_path(directory)
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


def load_checkpoint_weights(model: nnx.Module, path: str) -> list[str]:
  """Loads all weights of a checkpoint (see ``locate``; the newest step that restores) into
  ``model`` (same architecture)."""
  directory, step = locate(path)
  flat_model = traverse_util.flatten_dict(nnx.state(model).to_pure_dict())

  def restore(step):
    saved = restore_config(mngr, step).model
    flat_saved = traverse_util.flatten_dict(
        nnx.state(models.abstract_model(saved)).to_pure_dict())
    diff = sorted(path_name(p) for p in set(flat_saved) ^ set(flat_model)) + [
        f'{path_name(p)}: checkpoint {flat_saved[p].shape}, model {flat_model[p].shape}'
        for p in set(flat_saved) & set(flat_model) if flat_saved[p].shape != flat_model[p].shape]
    if diff:
      raise ConfigMismatchError(
          f'The checkpoint in {directory} (step {step}) is a different architecture from '
          f'the model (checkpoint model config: {saved.to_dict()}).\n'
          + listing('Differences', sorted(diff)))
    restore_model_into(mngr, step, model)

  with manager(directory, read_only=True) as mngr:
    restore_newest(mngr, restore, step=step)
  return [path_name(p) for p in flat_model]


INIT_FROM = {'imagenet': load_encoder_init, 'checkpoint': load_checkpoint_weights}


def init_from(model: nnx.Module, spec: str) -> list[str]:
  """Initialises ``model`` from ``'imagenet:DIR'`` or ``'checkpoint:DIR'``; '' does nothing.

  Returns the names of the tensors loaded (the rest keep their random init).
  """
  if not spec:
    return []
  check_init_from(spec)
  kind, _, directory = spec.partition(':')
  return INIT_FROM[kind](model, directory)


def check_init_from(spec: str) -> None:
  """Stops on an ``init_from`` that names no folder, before a new run compiles its step."""
  if not spec:
    return
  kind, sep, directory = spec.partition(':')
  if not sep or kind not in INIT_FROM or not directory:
    raise ValueError(f'init_from={spec!r}: use "imagenet:DIR" (from `python -m hded_jax.convert '
                     'imagenet`), "checkpoint:DIR" (a hded-jax checkpoint directory) or "".')
  if not os.path.isdir(runtime.local_path(directory)):
    raise FileNotFoundError(f'init_from={spec!r}: {directory} is not a folder.')
