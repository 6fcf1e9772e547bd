"""Metrics against independent numpy / scikit-image computations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from hded_jax import metrics

MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0


def numpy_depth_metrics(pred, gt, valid):
  """The textbook formulas on the selected pixels (boolean indexing, float64)."""
  gt = gt[valid].astype(np.float64)
  pred = np.clip(pred[valid].astype(np.float64), MIN_DEPTH, MAX_DEPTH)
  ratio = np.maximum(pred / gt, gt / pred)
  return dict(
      abs_rel=np.mean(np.abs(pred - gt) / gt),
      sq_rel=np.mean((pred - gt)**2 / gt),
      rmse=np.sqrt(np.mean((pred - gt)**2)),
      rmse_log=np.sqrt(np.mean((np.log(pred) - np.log(gt))**2)),
      log10=np.mean(np.abs(np.log10(pred) - np.log10(gt))),
      delta1=np.mean(ratio < 1.25),
      delta2=np.mean(ratio < 1.25**2),
      delta3=np.mean(ratio < 1.25**3),
  )


def skimage_ssim(a, b):
  return structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, channel_axis=-1, data_range=1)


def random_depths(rng, shape):
  gt = rng.uniform(0.5, 9.0, shape).astype(np.float32)
  # Out-of-range ground truth (missing, too far) and predictions needing clipping.
  gt[rng.random(shape) < 0.2] = 0.0
  gt[rng.random(shape) < 0.05] = 12.0
  pred = (gt * rng.uniform(0.6, 1.5, shape)).astype(np.float32)
  pred[rng.random(shape) < 0.05] = -1.0
  pred[rng.random(shape) < 0.05] = 50.0
  return pred, gt


@pytest.mark.parametrize('crop', [None, (3, 20, 5, 27)])
def test_depth_metrics_match_numpy(crop):
  rng = np.random.default_rng(0)
  pred, gt = random_depths(rng, (3, 24, 32))
  depth_valid = rng.random(gt.shape) > 0.1
  got = metrics.depth_metrics(pred, gt, MIN_DEPTH, MAX_DEPTH, crop=crop, valid=depth_valid)
  for i in range(3):
    valid = depth_valid[i] & (gt[i] > MIN_DEPTH) & (gt[i] < MAX_DEPTH)
    if crop is not None:
      in_crop = np.zeros_like(valid)
      in_crop[crop[0]:crop[1], crop[2]:crop[3]] = True
      valid &= in_crop
    want = numpy_depth_metrics(pred[i], gt[i], valid)
    assert got['valid_pixels'][i] == valid.sum()
    for name, value in want.items():
      np.testing.assert_allclose(got[name][i], value, rtol=2e-5, atol=1e-6, err_msg=name)


def test_depth_metrics_single_map_jit_and_clipping():
  rng = np.random.default_rng(1)
  pred, gt = random_depths(rng, (16, 16))
  fn = jax.jit(functools.partial(metrics.depth_metrics, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH,
                                 crop=(0, 16, 2, 14)))
  got = fn(pred, gt)
  assert got['abs_rel'].shape == () and got['valid_pixels'].shape == ()
  # Negative predictions would give NaN logs without the clipping.
  assert (pred < 0).any() and all(np.isfinite(v) for v in got.values())
  clipped = fn(np.clip(pred, MIN_DEPTH, MAX_DEPTH), gt)
  for name in metrics.DEPTH_METRICS:
    np.testing.assert_allclose(got[name], clipped[name], rtol=1e-6)


def test_depth_metrics_no_valid_pixel_is_finite():
  gt = np.zeros((2, 8, 8), np.float32)
  gt[1] = 2.0
  got = metrics.depth_metrics(np.ones_like(gt), gt, MIN_DEPTH, MAX_DEPTH)
  np.testing.assert_array_equal(got['valid_pixels'], [0, 64])
  assert all(np.isfinite(v).all() for v in got.values())


def test_bad_crop_and_range_raise():
  depth = np.ones((4, 8, 8), np.float32)
  with pytest.raises(ValueError, match='does not fit'):
    metrics.depth_metrics(depth, depth, MIN_DEPTH, MAX_DEPTH, crop=(45, 471, 41, 601))
  with pytest.raises(ValueError, match='min_depth'):
    metrics.depth_metrics(depth, depth, 0.0, MAX_DEPTH)


def test_psnr_and_ssim_match_references():
  rng = np.random.default_rng(2)
  # Smooth images with noise: SSIM well away from both 0 and 1.
  sharp = np.cumsum(np.cumsum(rng.random((2, 3, 24, 30, 3)), axis=2), axis=3)
  sharp = (sharp / sharp.max(axis=(2, 3, 4), keepdims=True)).astype(np.float32)
  noisy = np.clip(sharp + 0.05 * rng.standard_normal(sharp.shape), 0, 1).astype(np.float32)
  got_psnr = jax.jit(metrics.psnr)(noisy, sharp)
  got_ssim = jax.jit(metrics.ssim)(noisy, sharp)
  assert got_psnr.shape == got_ssim.shape == (2, 3)
  for index in np.ndindex(2, 3):
    mse = np.mean((noisy[index].astype(np.float64) - sharp[index])**2)
    np.testing.assert_allclose(got_psnr[index], 10 * np.log10(1 / mse), rtol=1e-5)
    np.testing.assert_allclose(got_ssim[index], skimage_ssim(noisy[index], sharp[index]),
                               atol=1e-5)
  # data_range scales the SSIM constants with the images.
  np.testing.assert_allclose(metrics.ssim(2 * noisy, 2 * sharp, data_range=2.0), got_ssim,
                             atol=1e-5)


def test_ssim_map_is_skimage_full_map_without_border():
  rng = np.random.default_rng(3)
  a, b = rng.random((2, 20, 17, 3)).astype(np.float32)
  _, full = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, full=True,
                                  use_sample_covariance=False, channel_axis=-1, data_range=1)
  np.testing.assert_allclose(metrics.ssim_map(a, b), full[5:-5, 5:-5], atol=1e-5)
  with pytest.raises(ValueError, match='at least 11x11'):
    metrics.ssim(a[:10], b[:10])


def make_eval_batch(rng, n=4, h=16, w=16):
  pred_depth, gt_depth = random_depths(rng, (n, h, w))
  aif = rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
  blur = lambda x: (x + np.roll(x, 1, axis=1) + np.roll(x, 1, axis=2)) / 3
  batch = dict(image=blur(aif), aif=aif, depth=gt_depth,
               depth_valid=np.ones(gt_depth.shape, bool),
               example_mask=np.ones(n, np.float32))
  outputs = dict(depth=pred_depth, aif=np.clip(aif + 0.1 * rng.standard_normal(aif.shape), -1.2,
                                               1.2).astype(np.float32))
  return outputs, batch


@jax.jit
def eval_values(outputs, batch):
  return metrics.eval_metrics(outputs, batch, min_depth=MIN_DEPTH, max_depth=MAX_DEPTH)


@jax.jit
def eval_fn(outputs, batch):
  return metrics.EvalMetrics.from_model_output(*eval_values(outputs, batch))


def test_eval_metrics_keys_and_image_mapping():
  outputs, batch = make_eval_batch(np.random.default_rng(4))
  values, masks = eval_values(outputs, batch)
  want_keys = ({f'depth/{name}' for name in metrics.DEPTH_METRICS}
               | {'aif/psnr', 'aif/ssim', 'input/psnr', 'input/ssim'})
  assert set(values) == set(masks) == want_keys
  unit = lambda x: np.clip((x + 1) / 2, 0, 1)
  for i in range(4):
    np.testing.assert_allclose(values['aif/ssim'][i],
                               skimage_ssim(unit(outputs['aif'][i]), unit(batch['aif'][i])),
                               atol=1e-5)
    mse = np.mean((unit(batch['image'][i]).astype(np.float64) - unit(batch['aif'][i]))**2)
    np.testing.assert_allclose(values['input/psnr'][i], -10 * np.log10(mse), rtol=1e-5)


def test_eval_metrics_depth_only_model():
  outputs, batch = make_eval_batch(np.random.default_rng(5))
  values, _ = eval_values({'depth': outputs['depth']}, batch)
  assert not any(key.startswith('aif/') for key in values)
  assert {'depth/rmse', 'input/ssim'} <= set(values)


def test_dataset_means_skip_padding_and_images_without_depth():
  rng = np.random.default_rng(6)
  outputs, batch = make_eval_batch(rng)
  batch['example_mask'] = np.array([1, 1, 1, 0], np.float32)  # last example is padding
  batch['depth_valid'][1] = False  # image 1 has no ground-truth depth
  outputs['depth'][3] = np.nan  # garbage in the padded example must not leak
  outputs['aif'][3] = np.nan
  values, _ = eval_values(outputs, batch)
  result = eval_fn(outputs, batch)
  means = result.compute()
  counts = result.num_images()
  assert counts['depth/rmse'] == 2 and counts['aif/psnr'] == 3 and counts['input/ssim'] == 3
  np.testing.assert_allclose(means['depth/rmse'], np.mean(np.asarray(values['depth/rmse'])[[0, 2]]),
                             rtol=1e-6)
  np.testing.assert_allclose(means['aif/psnr'], np.mean(np.asarray(values['aif/psnr'])[:3]),
                             rtol=1e-6)
  assert all(np.isfinite(v) for v in means.values())


def test_merging_batches_equals_one_big_batch():
  outputs, batch = make_eval_batch(np.random.default_rng(7), n=8)
  batch['example_mask'][7] = 0
  batch['depth_valid'][2] = False
  halves = [jax.tree.map(lambda x, s=s: x[s], (outputs, batch))
            for s in (slice(0, 4), slice(4, 8))]
  per_half = [eval_fn(*half) for half in halves]
  merged = metrics.EvalMetrics.empty()
  for half in per_half:
    merged = merged.merge(half)
  whole = eval_fn(outputs, batch)
  # The same across devices: stacked per-device metrics reduced along the leading axis.
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *per_half)
  for result in (merged, stacked.reduce()):
    assert result.num_images() == whole.num_images()
    for key, value in whole.compute().items():
      np.testing.assert_allclose(result.compute()[key], value, rtol=1e-5, err_msg=key)


def test_key_without_any_image_is_nan():
  outputs, batch = make_eval_batch(np.random.default_rng(8))
  batch['depth_valid'][:] = False
  means = eval_fn(outputs, batch).compute()
  assert np.isnan(means['depth/abs_rel']) and np.isfinite(means['aif/ssim'])


def _bilinear_reference(x, size):
  """Bilinear interpolation with half-pixel centres and no antialiasing, one axis at a time
  (what cv2.resize INTER_LINEAR and torch's interpolate(align_corners=False) compute)."""
  for axis, n_out in ((0, size[0]), (1, size[1])):
    n_in = x.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    t = (pos - lo).reshape([-1 if a == axis else 1 for a in range(2)])
    x = np.take(x, lo, axis) * (1 - t) + np.take(x, hi, axis) * t
  return x


def test_resize_depth_is_plain_bilinear_interpolation():
  depth = np.random.default_rng(9).uniform(1, 10, (2, 48, 64)).astype(np.float32)
  for size in ((96, 128), (11, 61), (480, 640)):  # Up, down by ~4-5x (no antialiasing), mixed.
    got = np.asarray(metrics.resize_depth(depth, size))
    for i in range(2):
      np.testing.assert_allclose(got[i], _bilinear_reference(depth[i], size), atol=1e-4)


def test_eval_protocols_are_named_and_the_nyu_crop_fits_its_frame():
  nyu = metrics.eval_protocol('nyu_literature')
  assert nyu.native_resolution and nyu.crop == (45, 471, 41, 601)
  assert not metrics.eval_protocol('authors').native_resolution
  with pytest.raises(ValueError, match='config.dataset.eval_protocol'):
    metrics.eval_protocol('eigen')
  gt = np.full((1, 480, 640), 5.0, np.float32)
  pixels = metrics.depth_metrics(gt, gt, MIN_DEPTH, MAX_DEPTH, crop=nyu.crop)['valid_pixels']
  assert int(pixels[0]) == (471 - 45) * (601 - 41)
