"""Evaluation metrics: depth errors, PSNR/SSIM, and their dataset-level accumulation.

Every function works per image on batched arrays and uses masks instead of boolean indexing, so
it runs under ``jax.jit``. Dataset figures are means over images (each image's metric first, then
the average over images), the convention of the depth-estimation literature.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from hded_jax import images

@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  """Where depth is scored and which pixels count (the dataset config gives the depth range)."""
  description: str
  # True: the prediction is resized (bilinear) to the stored ground truth's grid; False: the
  # ground truth is resized (nearest) to the network's input size.
  native_resolution: bool
  crop: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) on that grid.


EVAL_PROTOCOLS = {
    'nyu_literature': EvalProtocol(
        'the depth literature\'s NYU protocol: prediction resized to the 480x640 ground truth, '
        'scored in the crop rows 45:471, columns 41:601', native_resolution=True,
        crop=(45, 471, 41, 601)),
    'make3d_literature': EvalProtocol(
        'the depth literature\'s Make3D protocol: prediction resized to the 55x305 depth grid',
        native_resolution=True),
    'authors': EvalProtocol(
        'the 2HDED:NET authors\' protocol: scored at the network\'s input size (256x256 for the '
        'authors), ground truth resized by nearest neighbour', native_resolution=False),
}


def eval_protocol(name: str) -> EvalProtocol:
  if name not in EVAL_PROTOCOLS:
    raise ValueError(f'Unknown evaluation protocol {name!r}; choose one of '
                     f'{sorted(EVAL_PROTOCOLS)} (config.dataset.eval_protocol).')
  return EVAL_PROTOCOLS[name]


def resize_depth(depth: jax.Array, size: Sequence[int]) -> jax.Array:
  """(N, H, W) depth maps to (N, *size), bilinear without antialiasing, as the literature's
  interpolation (half-pixel centres)."""
  return jax.image.resize(depth, (depth.shape[0], *size), 'linear', antialias=False)


DEPTH_METRICS = ('abs_rel', 'sq_rel', 'rmse', 'rmse_log', 'log10', 'delta1', 'delta2', 'delta3')

# SSIM constants of Wang et al. (2004), with skimage's Gaussian window: sigma 1.5 truncated at
# 3.5 sigma, i.e. an 11-tap window.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """sum(mask * x) / max(sum(mask), 1); entries where mask == 0 never leak in, even NaN or inf."""
  mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
  total = jnp.sum(jnp.where(mask > 0, x, 0) * mask, axis=axis)
  return total / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def depth_metrics(pred: jax.Array, gt: jax.Array, min_depth: float, max_depth: float,
                  crop: Sequence[int] | None = None,
                  valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """Standard depth errors of (N, H, W) or (H, W) depth maps in metres, per image.

  A pixel counts when ``min_depth < gt < max_depth``, it lies inside ``crop`` = (top, bottom,
  left, right) slice bounds (NYU-v2's eval crop is (45, 471, 41, 601) of the 480x640 frame) and,
  if given, ``valid`` is true there. Predictions are clipped to [min_depth, max_depth] first, so
  the log metrics stay finite whatever the network outputs.

  Returns:
    The metrics of ``DEPTH_METRICS`` and ``valid_pixels``, each of shape (N,) (scalars for one
    map). An image without a valid pixel gets zeros and ``valid_pixels == 0``: leave it out of
    dataset means (``eval_metrics`` does).
  """
  if not 0 < min_depth < max_depth:
    raise ValueError(f'Need 0 < min_depth < max_depth, got min_depth={min_depth}, '
                     f'max_depth={max_depth}: the log metrics are undefined at depth <= 0.')
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  if pred.shape != gt.shape or pred.ndim not in (2, 3):
    raise ValueError(f'pred {pred.shape} and gt {gt.shape} must be equal (H, W) or (N, H, W) '
                     'depth maps.')
  mask = (gt > min_depth) & (gt < max_depth)
  if valid is not None:
    mask &= jnp.asarray(valid).astype(bool)
  if crop is not None:
    mask &= _crop_mask(crop, gt.shape[-2:])
  # Placeholders at invalid pixels keep every intermediate finite (the masked means drop them).
  gt = jnp.where(mask, gt, 1.0)
  pred = jnp.where(mask, jnp.clip(pred, min_depth, max_depth), 1.0)

  axes = (-2, -1)
  mean = lambda x: masked_mean(x, mask, axis=axes)
  diff = pred - gt
  ratio = jnp.maximum(pred / gt, gt / pred)
  values = dict(
      abs_rel=mean(jnp.abs(diff) / gt),
      sq_rel=mean(diff**2 / gt),
      rmse=jnp.sqrt(mean(diff**2)),
      rmse_log=jnp.sqrt(mean((jnp.log(pred) - jnp.log(gt))**2)),
      log10=mean(jnp.abs(jnp.log10(pred) - jnp.log10(gt))),
      **{f'delta{k}': mean((ratio < 1.25**k).astype(jnp.float32)) for k in (1, 2, 3)},
  )
  values['valid_pixels'] = jnp.sum(mask, axis=axes, dtype=jnp.int32)
  return values


def _crop_mask(crop: Sequence[int], shape: Sequence[int]) -> jax.Array:
  height, width = shape
  top, bottom, left, right = crop
  if not (0 <= top < bottom <= height and 0 <= left < right <= width):
    raise ValueError(f'Eval crop (top, bottom, left, right)={tuple(crop)} does not fit the '
                     f'{height}x{width} depth map; scale the crop to the evaluation resolution '
                     'or set it to None.')
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


def psnr(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
  """PSNR in dB of (..., H, W, C) images, per image; identical images give inf."""
  pred, target = _check_images(pred, target)
  mse = jnp.mean((pred - target)**2, axis=(-3, -2, -1))
  return 10.0 * jnp.log10(data_range**2 / mse)


def ssim(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Mean SSIM of (..., H, W, C) images, per image.

  Matches ``skimage.metrics.structural_similarity(pred, target, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=-1, data_range=data_range)``.
  """
  return jnp.mean(ssim_map(pred, target, data_range), axis=(-3, -2, -1))


def ssim_map(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-pixel SSIM with an 11x11 Gaussian window (sigma 1.5), valid positions only.

  The map is (..., H - 10, W - 10, C): skimage also drops the 5-pixel border, where its filter
  would read reflected padding, before averaging.
  """
  pred, target = _check_images(pred, target)
  window = 2 * SSIM_RADIUS + 1
  if min(pred.shape[-3:-1]) < window:
    raise ValueError(f'SSIM needs images of at least {window}x{window} pixels, got '
                     f'{pred.shape[-3]}x{pred.shape[-2]}.')
  c1 = (SSIM_K1 * data_range)**2
  c2 = (SSIM_K2 * data_range)**2
  mu_x, mu_y, mu_xx, mu_yy, mu_xy = _gaussian_filter_valid(
      jnp.stack([pred, target, pred * pred, target * target, pred * target]))
  var_x = mu_xx - mu_x * mu_x
  var_y = mu_yy - mu_y * mu_y
  cov_xy = mu_xy - mu_x * mu_y
  return (((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2))
          / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))


def _check_images(pred, target) -> tuple[jax.Array, jax.Array]:
  pred = jnp.asarray(pred, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  if pred.shape != target.shape or pred.ndim < 3:
    raise ValueError(f'Images {pred.shape} and {target.shape} must have the same (..., H, W, C) '
                     'shape.')
  return pred, target


def _gaussian_filter_valid(x: jax.Array) -> jax.Array:
  """Separable Gaussian filter over the H, W axes of (..., H, W, C), 'valid' positions only."""
  offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1)
  taps = np.exp(-0.5 * (offsets / SSIM_SIGMA)**2)
  taps = jnp.asarray(taps / taps.sum(), jnp.float32)
  *batch, height, width, channels = x.shape
  # Channels become batch entries so one single-channel kernel filters them all.
  y = jnp.moveaxis(x, -1, -3).reshape(-1, height, width, 1)
  for kernel_shape in ((taps.size, 1, 1, 1), (1, taps.size, 1, 1)):
    # HIGHEST: TF32 convolutions would ruin the variance terms (differences of close numbers).
    y = jax.lax.conv_general_dilated(
        y, taps.reshape(kernel_shape), (1, 1), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  y = y.reshape(*batch, channels, *y.shape[1:3])
  return jnp.moveaxis(y, -3, -1)


def eval_metrics(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *,
                 min_depth: float, max_depth: float, crop: Sequence[int] | None = None,
                 ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Per-image metrics of one batch, and which images may count in dataset means.

  Keys: ``depth/<name>`` for each of ``DEPTH_METRICS`` when the model has a depth head,
  ``aif/psnr`` and ``aif/ssim`` when it has an AiF head, and ``input/psnr``, ``input/ssim`` (the
  defocused input against the sharp image: the do-nothing baseline) when the batch has an
  ``aif`` target. Images in [-1, 1] are mapped to [0, 1] and clipped before PSNR/SSIM.

  Returns:
    ``(values, masks)``: two dicts with the same keys, each entry of shape (N,). A mask is 0 for
    padded examples (``batch['example_mask']``) and, for depth metrics, for images without a
    valid depth pixel. Feed both to ``EvalMetrics.from_model_output``.
  """
  num_images = batch['image'].shape[0]
  example_mask = jnp.asarray(batch.get('example_mask', jnp.ones(num_images)), bool)
  values, masks = {}, {}
  if 'depth' in outputs:
    depth_values = depth_metrics(outputs['depth'], batch['depth'], min_depth, max_depth,
                                 crop=crop, valid=batch.get('depth_valid'))
    has_depth = example_mask & (depth_values['valid_pixels'] > 0)
    for name in DEPTH_METRICS:
      values[f'depth/{name}'] = depth_values[name]
      masks[f'depth/{name}'] = has_depth
  to_unit = lambda image: images.to_clipped_unit_range(jnp.asarray(image, jnp.float32))
  compared = {}
  if 'aif' in outputs:
    if 'aif' not in batch:
      raise ValueError('The model predicts an all-in-focus image but the batch has no "aif" '
                       'target to compare it with.')
    compared['aif'] = outputs['aif']
  if 'aif' in batch:
    compared['input'] = batch['image']
  for name, image in compared.items():
    image, target = to_unit(image), to_unit(batch['aif'])
    values[f'{name}/psnr'] = psnr(image, target)
    values[f'{name}/ssim'] = ssim(image, target)
    masks[f'{name}/psnr'] = masks[f'{name}/ssim'] = example_mask
  return values, masks


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Metric):
  """Dataset means of per-image metrics, accumulated across batches and devices.

  Each key's mean is over the images its mask admits, so padded examples and images without
  valid depth never count. Build it inside the jitted eval step; with ``jax.jit`` over sharded
  arrays each batch's values are already global, so ``from_model_output`` then ``merge``
  suffice (clu's pmap-only ``gather_from_model_output`` is not used). ``reduce`` also works, as
  for ``clu.metrics.Average``. It is a ``clu.metrics.Metric`` rather than a ``Collection``
  because the metric names contain '/', which dataclass fields cannot.
  """

  totals: dict[str, jax.Array]
  counts: dict[str, jax.Array]

  @classmethod
  def empty(cls) -> 'EvalMetrics':
    return cls(totals={}, counts={})

  @classmethod
  def from_model_output(cls, values: Mapping[str, jax.Array], masks: Mapping[str, jax.Array],
                        **_: Any) -> 'EvalMetrics':
    if set(values) != set(masks):
      raise ValueError(f'values and masks need the same keys, got {sorted(values)} and '
                       f'{sorted(masks)}.')
    keep = {k: jnp.asarray(masks[k]).astype(bool) for k in values}
    return cls(
        totals={k: jnp.sum(jnp.where(keep[k], v, 0.0), dtype=jnp.float32)
                for k, v in values.items()},
        counts={k: jnp.sum(m, dtype=jnp.int32) for k, m in keep.items()})

  def merge(self, other: 'EvalMetrics') -> 'EvalMetrics':
    keys = self.totals.keys() | other.totals.keys()
    add = lambda a, b, k: a.get(k, 0) + b.get(k, 0)
    return type(self)(totals={k: add(self.totals, other.totals, k) for k in keys},
                      counts={k: add(self.counts, other.counts, k) for k in keys})

  def compute(self) -> dict[str, jax.Array]:
    """Mean per key; NaN for a key no image counted in (nothing to average)."""
    return {k: self.totals[k] / self.counts[k] for k in sorted(self.totals)}

  def num_images(self) -> dict[str, jax.Array]:
    """How many images each mean in ``compute`` is over."""
    return dict(self.counts)
