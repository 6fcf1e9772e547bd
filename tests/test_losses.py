"""Loss terms against independent numpy / scikit-image computations, and their masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import correlate2d
from skimage.metrics import structural_similarity

from hded_jax import losses

ALL_TERMS = dict(depth_l1=1.0, depth_charbonnier=1.0, depth_gradient=1.0, aif_l1=1.0,
                 aif_charbonnier=1.0, aif_ssim=1.0, charbonnier_eps=1e-3)


def make_batch(seed=0, n=3, h=16, w=20):
  rng = np.random.default_rng(seed)
  depth = rng.uniform(0.5, 8.0, (n, h, w)).astype(np.float32)
  aif = rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
  batch = dict(depth=depth, aif=aif, depth_valid=rng.random((n, h, w)) > 0.2,
               example_mask=np.array([1.0] * (n - 1) + [0.0], np.float32))
  outputs = dict(depth=(depth + rng.normal(0, 0.5, depth.shape)).astype(np.float32),
                 aif=(aif + rng.normal(0, 0.2, aif.shape)).astype(np.float32))
  return outputs, batch


def loss_config(**weights):
  config = losses.default_loss_config()
  for name in losses.LOSS_TERMS:
    config[name] = weights.get(name, 0.0)
  config.charbonnier_eps = weights.get('charbonnier_eps', config.charbonnier_eps)
  return config


def numpy_terms(outputs, batch, eps):
  """Every term, from the formulas of docs/training.md (float64, explicit loops over images)."""
  keep = batch['example_mask'] > 0
  mask = batch['depth_valid'] & keep[:, None, None]
  diff = outputs['depth'].astype(np.float64) - batch['depth']
  prewitt_x = np.array([[-1, 0, 1]] * 3)
  gradient_sum, gradient_count = 0.0, 0
  for i in range(len(diff)):
    grad = (np.abs(correlate2d(diff[i], prewitt_x, 'valid'))
            + np.abs(correlate2d(diff[i], prewitt_x.T, 'valid')))
    full_stencil = sliding_window_view(mask[i], (3, 3)).all(axis=(-2, -1))
    gradient_sum += grad[full_stencil].sum()
    gradient_count += full_stencil.sum()
  aif_diff = outputs['aif'][keep].astype(np.float64) - batch['aif'][keep]
  unit = lambda x: (x + 1) / 2
  ssims = [structural_similarity(unit(a), unit(b), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=-1, data_range=1)
           for a, b in zip(outputs['aif'][keep], batch['aif'][keep])]
  return dict(
      depth_l1=np.abs(diff[mask]).mean(),
      depth_charbonnier=np.sqrt(diff[mask]**2 + eps).mean(),
      depth_gradient=gradient_sum / gradient_count,
      aif_l1=np.abs(aif_diff).mean(),
      aif_charbonnier=np.sqrt(aif_diff**2 + eps).mean(),
      aif_ssim=1 - np.mean(ssims),
  )


def test_every_term_matches_numpy():
  outputs, batch = make_batch()
  weights = {name: 0.5 + i for i, name in enumerate(losses.LOSS_TERMS)}
  config = loss_config(**weights, charbonnier_eps=1e-3)
  total, terms = jax.jit(lambda o, b: losses.compute_loss(o, b, config))(outputs, batch)
  want = numpy_terms(outputs, batch, eps=1e-3)
  assert set(terms) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-5, err_msg=name)
  np.testing.assert_allclose(total, sum(weights[k] * want[k] for k in want), rtol=2e-5)


def test_default_config_is_the_authors_latest():
  config = losses.default_loss_config()
  assert set(config.keys()) == set(losses.LOSS_CONFIG_KEYS)
  assert (config.depth_l1, config.aif_l1, config.charbonnier_eps) == (1.0, 0.1, 1e-6)
  assert all(config[name] == 0.0 for name in losses.LOSS_TERMS if name not in
             ('depth_l1', 'aif_l1'))
  outputs, batch = make_batch(1)
  total, terms = losses.compute_loss(outputs, batch, config)
  want = numpy_terms(outputs, batch, eps=1e-6)
  assert set(terms) == {'depth_l1', 'aif_l1'}
  np.testing.assert_allclose(total, want['depth_l1'] + 0.1 * want['aif_l1'], rtol=2e-5)


def test_invalid_pixels_change_neither_loss_nor_gradient():
  outputs, batch = make_batch(2)
  config = loss_config(**ALL_TERMS)

  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda out, batch: losses.compute_loss(out, batch, config)[0]))
  loss, grad = loss_and_grad(outputs, batch)
  corrupted = dict(batch)
  invalid = ~batch['depth_valid']
  garbage = np.where(np.arange(invalid.shape[-1]) % 2, np.inf, np.nan)
  corrupted['depth'] = np.where(invalid, garbage, batch['depth']).astype(np.float32)
  corrupted['depth'][-1] = -5.0  # the padded example
  corrupted['aif'] = batch['aif'].copy()
  corrupted['aif'][-1] = np.nan
  corrupted_loss, corrupted_grad = loss_and_grad(outputs, corrupted)
  np.testing.assert_allclose(corrupted_loss, loss, rtol=1e-6)
  for head in ('depth', 'aif'):
    np.testing.assert_allclose(corrupted_grad[head], grad[head], rtol=1e-6, atol=1e-12)
  # Invalid pixels get no gradient at all (the gradient term reaches only full stencils).
  assert not np.asarray(grad['depth'])[invalid].any()
  assert not np.asarray(grad['aif'])[-1].any()


def test_depth_only_model():
  outputs, batch = make_batch(3)
  total, terms = losses.compute_loss({'depth': outputs['depth']}, batch,
                                     loss_config(depth_l1=1.0, depth_gradient=0.5))
  assert set(terms) == {'depth_l1', 'depth_gradient'}
  np.testing.assert_allclose(total, terms['depth_l1'] + 0.5 * terms['depth_gradient'])
  with pytest.raises(ValueError, match="no 'aif' output"):
    losses.compute_loss({'depth': outputs['depth']}, batch, losses.default_loss_config())


def test_masks_default_to_every_pixel():
  outputs, batch = make_batch(4)
  del batch['depth_valid'], batch['example_mask']
  _, terms = losses.compute_loss(outputs, batch, loss_config(depth_l1=1.0, aif_l1=1.0))
  np.testing.assert_allclose(terms['depth_l1'],
                             np.abs(outputs['depth'] - batch['depth']).mean(), rtol=1e-5)
  np.testing.assert_allclose(terms['aif_l1'], np.abs(outputs['aif'] - batch['aif']).mean(),
                             rtol=1e-5)


@pytest.mark.parametrize('bad, message', [
    (dict(aif_l2=1.0), r"unknown keys \['aif_l2'\].*valid keys"),
    (dict(depth_l1=-1.0), 'must be >= 0'),
    ({name: 0.0 for name in losses.LOSS_TERMS}, 'nothing would train'),
    (dict(charbonnier_eps=0.0), 'charbonnier_eps must be > 0'),
])
def test_bad_configs_raise(bad, message):
  outputs, batch = make_batch(5)
  config = dict(losses.default_loss_config(), **bad)
  with pytest.raises(ValueError, match=message):
    losses.compute_loss(outputs, batch, config)


def test_missing_config_key_raises():
  outputs, batch = make_batch(5)
  config = dict(losses.default_loss_config())
  del config['aif_ssim']
  with pytest.raises(ValueError, match=r"missing keys \['aif_ssim'\]"):
    losses.compute_loss(outputs, batch, config)


def test_paper_era_weights():
  outputs, batch = make_batch(6)
  total, terms = losses.compute_loss(
      outputs, batch, loss_config(depth_l1=0.001, aif_charbonnier=0.01, charbonnier_eps=1e-6))
  assert set(terms) == {'depth_l1', 'aif_charbonnier'}
  np.testing.assert_allclose(total, 0.001 * terms['depth_l1'] + 0.01 * terms['aif_charbonnier'],
                             rtol=1e-6)
  assert jnp.isfinite(total)
