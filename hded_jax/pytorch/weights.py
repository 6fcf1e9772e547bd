"""The official PyTorch weights in hded-jax's layout: torchvision's ImageNet DenseNet-121 and
official 2HDED:NET checkpoints (`python -m hded_jax.convert` is the command).

Layout changes (exact, so that converted models compute the PyTorch function): conv OIHW -> HWIO;
ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out) flipped spatially (our ``UpConv`` holds
a plain conv kernel, see ``models/layers.py``); BatchNorm weight/bias/running_mean/running_var ->
scale/bias/mean/var (``num_batches_tracked`` is dropped). torch is imported only to read files.
"""

import os
import pickle
import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx, traverse_util

from hded_jax import checkpoints, models, runtime

# hded-jax leaf -> PyTorch parameter/buffer name (BatchNorm and conv alike).
_LEAF_NAMES = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight', 'mean': 'running_mean',
               'var': 'running_var'}
_DECODERS = ('depth_decoder', 'aif_decoder')
# torchvision < 0.4 named dense-layer modules `norm.1` instead of `norm1` (likewise relu, conv).
_LEGACY_DENSELAYER = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.([12])\.(weight|bias|running_mean|running_var)$')

Path = checkpoints.Path
path_name = checkpoints.path_name


def _module_name(module: Path, num_decoder_blocks: int) -> str:
  """The official 2HDED:NET (and torchvision DenseNet) module name of an hded-jax module."""
  match module:
    case ('encoder', 'denseblocks', i, 'layers', j, name):
      return f'features.denseblock{i + 1}.denselayer{j + 1}.{name}'
    case ('encoder', 'transitions', i, name):
      return f'features.transition{i + 1}.{name}'
    case ('encoder', name):
      return f'features.{name}'
    case ('depth_decoder', 'blocks', k, name):
      d = num_decoder_blocks - k  # blocks[0] is d5.
      # The official code keeps d5..d3 in a shared-looking `decoder`, d2, d1 per task.
      prefix = 'decoder' if d >= 3 else 'decoder_tasks.0'
      return f'{prefix}.d_block{d}.0.{name}'
    case ('depth_decoder', 'last_conv'):
      return 'decoder_tasks.0.last_conv'
    case ('aif_decoder', 'blocks', k, name):
      return f'decoder_aif.d_aif_block{num_decoder_blocks - k}.0.{name}'
    case ('aif_decoder', 'last_conv'):
      return 'decoder_aif.last_aif_conv'
  raise ValueError(f'No PyTorch name for hded-jax module {path_name(module)}.')


def torch_names(pure: Mapping) -> dict[Path, str]:
  """hded-jax weight path -> PyTorch tensor name, for every weight in a model's pure state."""
  flat = traverse_util.flatten_dict(pure)
  num_blocks = {d: 1 + max((p[2] for p in flat if p[:2] == (d, 'blocks')), default=-1)
                for d in _DECODERS}
  names = {}
  for path in flat:
    *module, leaf = path
    names[path] = (f'{_module_name(tuple(module), num_blocks.get(path[0], 0))}.'
                   f'{_LEAF_NAMES[leaf]}')
  return names


def _is_conv_transpose(path: Path) -> bool:
  return path[0] in _DECODERS and path[1] == 'blocks' and path[3] == 'conv1'


def to_jax_layout(path: Path, array: np.ndarray) -> np.ndarray:
  """A PyTorch tensor in the layout hded-jax stores at ``path``."""
  if path[-1] != 'kernel' or array.ndim != 4:
    return array
  if _is_conv_transpose(path):
    return np.ascontiguousarray(array.transpose(2, 3, 0, 1)[::-1, ::-1])
  return np.ascontiguousarray(array.transpose(2, 3, 1, 0))


def canonical_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips DataParallel's `module.`, renames legacy torchvision keys, drops counters."""
  out = {}
  for key, value in state_dict.items():
    key = key.removeprefix('module.')
    key = _LEGACY_DENSELAYER.sub(r'\1\2.\3', key)
    if key.endswith('num_batches_tracked'):
      continue
    if key in out:
      raise ValueError(f'State dict holds {key!r} twice (once with a `module.` prefix or a '
                       'legacy name); keep one.')
    out[key] = value
  return out


def _new_directory(path: str) -> str:
  """Checks (before any slow work) that the output goes to a new or empty directory."""
  path = runtime.local_path(path)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f'{path} exists and is not empty; choose a new output directory.')
  return path


def match_state_dict(state_dict: Mapping[str, np.ndarray], target: Mapping, *,
                     strict: bool) -> tuple[dict[Path, np.ndarray], dict[str, str]]:
  """Converts the tensors of ``state_dict`` that belong at the weights of ``target``.

  ``target`` is a (possibly abstract) pure model state. Returns ({path: array in hded-jax
  layout}, {skipped PyTorch name: reason}). With ``strict``, any unknown or missing key or shape
  mismatch raises one ValueError listing them all; otherwise such tensors are skipped.
  """
  flat_target = traverse_util.flatten_dict(target)
  names = torch_names(target)
  converted, skipped, missing, mismatched = {}, {}, [], []
  for path, name in names.items():
    if name not in state_dict:
      missing.append(f'{name} (-> {path_name(path)})')
      continue
    array = to_jax_layout(path, np.asarray(state_dict[name], np.float32))
    expected = tuple(flat_target[path].shape)
    if array.shape != expected:
      reason = (f'{name} has shape {tuple(state_dict[name].shape)} (PyTorch layout) -> '
                f'{array.shape}, but {path_name(path)} needs {expected}')
      mismatched.append(reason)
      skipped[name] = f'shape mismatch: {reason}'
      continue
    converted[path] = array
  unknown = sorted(set(state_dict) - set(names.values()))
  if strict and (missing or mismatched or unknown):
    parts = [checkpoints.listing(t, items) for t, items in (
        ('Unknown keys (not in the model)', unknown), ('Missing keys', missing),
        ('Shape mismatches', mismatched)) if items]
    raise ValueError('The state dict does not fit the model.\n' + '\n'.join(parts))
  skipped.update({name: 'no such tensor in the hded-jax model' for name in unknown})
  return converted, skipped


def _unreadable(path: str, error: Exception) -> ValueError:
  first_line = str(error).strip().split('\n')[0][:200]
  return ValueError(f'{path} is not a PyTorch checkpoint that torch.load can read '
                    f'({type(error).__name__}: {first_line}); is it the whole file?')


def read_torch_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a `.pth`/`.pth.tar` file into numpy, unwrapping `state_dictG` / `state_dict`."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError('Reading PyTorch files needs torch: pip install "hded-jax[torch]" '
                      '(a CPU build is enough).') from e
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No PyTorch checkpoint at {path}.')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except pickle.UnpicklingError as e:
    if 'Unsupported global' not in str(e):  # Bytes that unpickle to no objects at all.
      raise _unreadable(path, e) from e
    raise ValueError(
        f'{path} holds more than tensors (e.g. pickled Python objects), which torch.load refuses '
        'to read safely. If you trust the file, pass --allow_pickle.') from e
  except Exception as e:  # pylint: disable=broad-except  (torch's errors for any other bytes)
    raise _unreadable(path, e) from e
  if isinstance(obj, Mapping):
    for key in ('state_dictG', 'state_dict'):
      if key in obj:
        obj = obj[key]
        break
  if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f'{path} is neither a state dict nor a dict holding `state_dictG` or '
                     f'`state_dict` (found {keys}).')
  return canonical_keys({k: v.detach().cpu().float().numpy() for k, v in obj.items()})


# ---------------------------------------------------------------------------------------------
# ImageNet encoder init (``config.init_from = 'imagenet:OUT_DIR'``).


def convert_imagenet(state_dict: Mapping[str, np.ndarray], out_dir: str, *,
                     source: str = '') -> list[str]:
  """Writes the torchvision tensors that fit the DenseNet-121 encoder; returns their names."""
  out_dir = _new_directory(out_dir)
  state_dict = canonical_keys(state_dict)
  abstract = models.abstract_model(models.model_config('densenet121'))
  target = {'encoder': nnx.state(abstract).to_pure_dict()['encoder']}
  converted, skipped = match_state_dict(state_dict, target, strict=False)
  if not converted:
    raise ValueError('No tensor of the state dict fits the DenseNet-121 encoder; is it '
                     "torchvision's densenet121 (keys like features.denseblock1...)?")
  names = torch_names(target)
  checkpoints.save_encoder_init(out_dir, converted, dict(
      source=source,
      loaded={path_name(p): dict(torch_name=names[p], shape=list(a.shape))
              for p, a in converted.items()},
      skipped=skipped))
  return [path_name(p) for p in converted]


# ---------------------------------------------------------------------------------------------
# Official 2HDED:NET checkpoints.


def infer_model_config(state_dict: Mapping[str, np.ndarray], *,
                       heads: Sequence[str] | None = None, aif_tanh: bool = False,
                       depth_scale: float = 1.0) -> ml_collections.ConfigDict:
  """The model config of an official state dict: DenseNet sizes and heads from its shapes."""
  first = 'features.denseblock1.denselayer1.'
  required = ['features.conv0.weight', first + 'conv1.weight', first + 'conv2.weight']
  if absent := [k for k in required if k not in state_dict]:
    raise ValueError(f'Not a 2HDED:NET state dict: no {", ".join(absent)} (it has '
                     f'{sorted(state_dict)[:5]}...).')
  layers = {}
  for key in state_dict:
    if m := re.match(r'features\.denseblock(\d+)\.denselayer(\d+)\.', key):
      block, layer = int(m[1]), int(m[2])
      layers[block] = max(layers.get(block, 0), layer)
  if sorted(layers) != list(range(1, len(layers) + 1)):
    raise ValueError(f'Dense blocks {sorted(layers)} are not numbered 1..{len(layers)}.')
  growth_rate = state_dict[first + 'conv2.weight'].shape[0]
  available = tuple(head for head in _HEAD_PREFIXES if _head_keys(state_dict, head))
  if not available:
    raise ValueError('The state dict has a DenseNet encoder but no decoder (no decoder., '
                     'decoder_tasks. or decoder_aif. keys): not a 2HDED:NET checkpoint. For '
                     "torchvision's ImageNet DenseNet-121 use `python -m hded_jax.convert "
                     'imagenet`.')
  heads = available if heads is None else tuple(heads)
  if set(heads) - set(available):
    raise ValueError(f'heads={heads}, but the checkpoint holds only the {available} heads.')
  config = models.model_config('densenet121')
  config.update(dict(
      block_sizes=tuple(layers[b] for b in sorted(layers)), growth_rate=growth_rate,
      num_init_features=state_dict['features.conv0.weight'].shape[0],
      bn_size=state_dict[first + 'conv1.weight'].shape[0] // growth_rate,
      heads=heads, aif_tanh=aif_tanh, depth_scale=depth_scale))
  return config


# Each head's decoder in the official state dicts (its depth decoder under either name).
_HEAD_PREFIXES = {'depth': ('decoder.', 'decoder_tasks.'), 'aif': ('decoder_aif.',)}


def _head_keys(state_dict: Mapping[str, np.ndarray], head: str) -> list[str]:
  return [k for k in state_dict if k.startswith(_HEAD_PREFIXES[head])]


def convert_official(state_dict: Mapping[str, np.ndarray], model_config: ml_collections.ConfigDict
                     ) -> nnx.Module:
  """An hded-jax model (eval mode) holding an official state dict's weights and BN stats."""
  state_dict = canonical_keys(state_dict)
  dropped = [k for h in set(models.hded_net.HEADS) - set(model_config.heads)
             for k in _head_keys(state_dict, h)]
  if dropped:
    logging.info('Leaving out the %d tensors of the heads not asked for.', len(dropped))
  for key in dropped:
    del state_dict[key]
  # Built abstractly: every weight comes from the state dict.
  graphdef, state = nnx.split(models.abstract_model(model_config))
  converted, _ = match_state_dict(state_dict, state.to_pure_dict(), strict=True)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {p: jnp.asarray(a) for p, a in converted.items()}))
  model = nnx.merge(graphdef, state)
  model.eval()
  return model


def write_official(in_path: str, out_dir: str, *, heads: Sequence[str] | None = None,
                   aif_tanh: bool = False, depth_scale: float = 1.0,
                   allow_pickle: bool = False) -> ml_collections.ConfigDict:
  """Converts an official checkpoint file into a hded-jax checkpoint directory (step 0)."""
  out_dir = _new_directory(out_dir)
  state_dict = read_torch_state_dict(in_path, allow_pickle=allow_pickle)
  model_config = infer_model_config(state_dict, heads=heads, aif_tanh=aif_tanh,
                                    depth_scale=depth_scale)
  model = convert_official(state_dict, model_config)
  config = ml_collections.ConfigDict(dict(model=model_config,
                                          converted_from=os.path.abspath(in_path)))
  checkpoints.save_model(out_dir, 0, model, config)
  return config


