"""Training losses: weighted L1, Charbonnier, depth-gradient and SSIM terms per head.

Every term is a mean over the pixels that may train it: pixels without ground-truth depth
(``batch['depth_valid']``) and padded examples (``batch['example_mask']``) never contribute, nor
does their gradient.
"""

from collections.abc import Callable, Mapping
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from hded_jax import images
from hded_jax.metrics import masked_mean, ssim

def default_loss_config() -> ml_collections.ConfigDict:
  """The authors' latest weights: 1.0 * L1(depth) + 0.1 * L1(AiF).

  The paper-era code used 0.001 * L1(depth) + 0.01 * Charbonnier(AiF) instead: set
  depth_l1=0.001, aif_l1=0.0, aif_charbonnier=0.01.
  """
  return ml_collections.ConfigDict(dict(
      depth_l1=1.0,
      depth_charbonnier=0.0,
      # mean(|Prewitt_x(gt - pred)| + |Prewitt_y(gt - pred)|) over fully valid 3x3 stencils.
      depth_gradient=0.0,
      aif_l1=0.1,
      aif_charbonnier=0.0,
      # 1 - SSIM of the images mapped to [0, 1] (11x11 Gaussian window, as in the metrics).
      aif_ssim=0.0,
      charbonnier_eps=1e-6,
  ))


def compute_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                 loss_config: Mapping[str, float]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted total loss and each non-zero-weight term, unweighted.

  Args:
    outputs: the model's {'depth': (N, H, W), 'aif': (N, H, W, 3)}; either may be absent.
    batch: 'depth' (N, H, W) metres and 'aif' (N, H, W, 3) in [-1, 1] targets, optionally
      'depth_valid' (N, H, W) and 'example_mask' (N,).
    loss_config: a weight for each of ``LOSS_TERMS`` plus ``charbonnier_eps`` (see
      ``default_loss_config``). Weights are static: zero-weight terms are not computed.

  Returns:
    ``(total, terms)`` with ``terms`` keyed like the config, e.g. ``terms['depth_l1']``.
  """
  weights, eps = _parse_loss_config(loss_config)
  first = next(iter(outputs.values()))
  example_mask = jnp.asarray(batch.get('example_mask', jnp.ones(first.shape[:1])), jnp.float32)
  terms = {}
  for head in ('depth', 'aif'):
    names = [name for name, term in LOSS_TERMS.items() if term.head == head and weights[name]]
    if not names:
      continue
    if head not in outputs:
      raise ValueError(f'Loss weights {names} are non-zero but the model has no {head!r} output '
                       f'(it has {sorted(outputs)}); set them to 0.0 in the loss config.')
    if head not in batch:
      raise ValueError(f'Loss weights {names} are non-zero but the batch has no {head!r} target '
                       f'(it has {sorted(batch)}).')
    pred = jnp.asarray(outputs[head], jnp.float32)
    target = jnp.asarray(batch[head], jnp.float32)
    if pred.shape != target.shape:
      raise ValueError(f'{head!r} prediction {pred.shape} and target {target.shape} differ in '
                       'shape.')
    if head == 'depth':
      valid = jnp.asarray(batch.get('depth_valid', jnp.ones(pred.shape)), jnp.float32)
      mask = valid * example_mask[:, None, None]
    else:
      mask = jnp.broadcast_to(example_mask[:, None, None, None], pred.shape)
    for name in names:
      terms[name] = LOSS_TERMS[name].fn(pred, target, mask, eps=eps)
  total = sum(weights[name] * value for name, value in terms.items())
  return total, terms


def _masked_diff(pred, target, mask):
  # Zeroed first: a NaN target at an invalid pixel would otherwise poison the gradient.
  return jnp.where(mask > 0, pred - target, 0.0)


def l1_loss(pred, target, mask, *, eps):
  del eps
  return masked_mean(jnp.abs(_masked_diff(pred, target, mask)), mask)


def charbonnier_loss(pred, target, mask, *, eps):
  return masked_mean(jnp.sqrt(_masked_diff(pred, target, mask)**2 + eps), mask)


def gradient_loss(pred, target, mask, *, eps=None):
  """mean(|Prewitt_x(diff)| + |Prewitt_y(diff)|) of (N, H, W) maps over fully valid stencils."""
  del eps
  diff = _masked_diff(pred, target, mask)
  rows = _sum3(diff, axis=-2)
  cols = _sum3(diff, axis=-1)
  grad_x = rows[..., 2:] - rows[..., :-2]
  grad_y = cols[..., 2:, :] - cols[..., :-2, :]
  # A stencil touching an invalid pixel would compare ground truth with a placeholder.
  stencil_mask = jax.lax.reduce_window(mask, jnp.inf, jax.lax.min, (1, 3, 3), (1, 1, 1), 'VALID')
  return masked_mean(jnp.abs(grad_x) + jnp.abs(grad_y), stencil_mask)


def _sum3(x: jax.Array, axis: int) -> jax.Array:
  """Sums of three neighbours along ``axis`` ('valid' positions only)."""
  length = x.shape[axis]
  return sum(jax.lax.slice_in_dim(x, i, length - 2 + i, axis=axis) for i in range(3))


def ssim_loss(pred, target, mask, *, eps=None):
  """1 - SSIM on [0, 1] like the metric (SSIM's luminance term is not shift invariant), over the
  examples the mask admits; masked-out pixels are zeroed so they cannot reach the gradient."""
  del eps
  to_unit = lambda image: jnp.where(mask > 0, images.to_unit_range(image), 0.0)
  example_mask = jnp.max(mask.reshape(mask.shape[0], -1), axis=1)
  return masked_mean(1.0 - ssim(to_unit(pred), to_unit(target)), example_mask)


@dataclasses.dataclass(frozen=True)
class LossTerm:
  head: str  # The model output and batch target it compares.
  fn: Callable[..., jax.Array]  # (pred, target, mask, *, eps) -> scalar.


# Every loss term, by its config key: adding one here makes it a weight in `config.loss`.
LOSS_TERMS = {
    'depth_l1': LossTerm('depth', l1_loss),
    'depth_charbonnier': LossTerm('depth', charbonnier_loss),
    'depth_gradient': LossTerm('depth', gradient_loss),
    'aif_l1': LossTerm('aif', l1_loss),
    'aif_charbonnier': LossTerm('aif', charbonnier_loss),
    'aif_ssim': LossTerm('aif', ssim_loss),
}
LOSS_CONFIG_KEYS = (*LOSS_TERMS, 'charbonnier_eps')


def _parse_loss_config(loss_config: Mapping[str, float]) -> tuple[dict[str, float], float]:
  keys = set(loss_config.keys())
  unknown = sorted(keys - set(LOSS_CONFIG_KEYS))
  missing = sorted(set(LOSS_CONFIG_KEYS) - keys)
  if unknown or missing:
    raise ValueError(f'Loss config: unknown keys {unknown}, missing keys {missing}. The valid '
                     f'keys are {list(LOSS_CONFIG_KEYS)}; start from default_loss_config().')
  weights = {name: float(loss_config[name]) for name in LOSS_TERMS}
  negative = {name: w for name, w in weights.items() if w < 0}
  if negative:
    raise ValueError(f'Loss weights must be >= 0, got {negative}.')
  if not any(weights.values()):
    raise ValueError(f'Every loss weight is 0, so nothing would train: set at least one of '
                     f'{list(LOSS_TERMS)}.')
  eps = float(loss_config['charbonnier_eps'])
  if eps <= 0:
    raise ValueError(f'charbonnier_eps must be > 0 (it keeps sqrt differentiable at 0), got {eps}.')
  return weights, eps
