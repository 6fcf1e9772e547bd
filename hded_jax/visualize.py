"""Pictures for people: depth colour maps (without matplotlib) and the eval panels in TensorBoard."""

from collections.abc import Mapping

import numpy as np

from hded_jax import images

# Turbo (Mikhailov, Google 2019) as its published degree-5 polynomial fit per channel.
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def turbo(x: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> float RGB in [0, 1] (shape + (3,))."""
  x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
  channels = [np.polynomial.polynomial.polyval(x, c) for c in (_TURBO_R, _TURBO_G, _TURBO_B)]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def colorize_depth(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """Depth (..., H, W) -> uint8 RGB (..., H, W, 3); near is blue, far is red."""
  if not vmax > vmin:
    vmax = vmin + 1e-6
  rgb = turbo((np.asarray(depth, np.float64) - vmin) / (vmax - vmin))
  return np.round(rgb * 255).astype(np.uint8)


def eval_panels(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                num_images: int, min_depth: float) -> dict[str, np.ndarray]:
  """TensorBoard images of an eval batch: the input, predicted|true depth (one colour scale)
  and predicted|true AiF, side by side."""
  n = num_images
  panels = {'input': images.to_uint8(batch['image'][:n])}
  if 'depth' in outputs:
    lo, hi = min_depth, float(np.max(batch['depth'][:n]))
    panels['depth/predicted_vs_true'] = np.concatenate([
        colorize_depth(outputs['depth'][:n], lo, hi),
        colorize_depth(batch['depth'][:n], lo, hi)], axis=2)
  if 'aif' in outputs:
    panels['aif/predicted_vs_true'] = np.concatenate([
        images.to_uint8(outputs['aif'][:n]), images.to_uint8(batch['aif'][:n])], axis=2)
  return panels
