"""The convolution with the matmul kernel gradient: same values and gradients as XLA's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export
from jax import lax

from hded_jax import models
from hded_jax.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv_fn, strides, padding):
  def loss(x, kernel):
    y = conv_fn(x, kernel, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y))  # A non-trivial cotangent.
  return loss


# Every kind the model has: 3x3 and 1x1, the stem's strided 3x3 and 4x4, the up-convs' 2x2
# phases with one-sided padding, plus negative (cropping) padding.
@pytest.mark.parametrize('kernel_size, strides, padding', [
    (3, (1, 1), ((1, 1), (1, 1))),
    (1, (1, 1), ((0, 0), (0, 0))),
    (3, (2, 2), ((1, 1), (1, 1))),
    (4, (2, 2), ((1, 1), (1, 1))),
    (2, (1, 1), ((1, 0), (0, 1))),
    (2, (1, 1), ((0, 1), (1, 0))),
    (3, (1, 2), ((0, 2), (1, -1))),
])
def test_values_and_gradients_match_xla(kernel_size, strides, padding):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 7)), jnp.float32)
  ours = jax.jit(jax.value_and_grad(_loss(conv.conv_general_dilated, strides, padding), (0, 1)))
  xla = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, strides, padding), (0, 1)))
  (value, (dx, dk)), (ref_value, (ref_dx, ref_dk)) = ours(x, kernel), xla(x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, ref_dk, rtol=1e-5, atol=1e-5)


def test_bfloat16_kernel_gradient_keeps_the_dtype_and_accumulates_in_float32():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(4, 16, 16, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 8, 4)), jnp.bfloat16)
  padding = ((1, 1), (1, 1))
  dk = jax.jit(jax.grad(_loss(conv.conv_general_dilated, (1, 1), padding), 1))(x, kernel)
  ref = jax.jit(jax.grad(_loss(lax.conv_general_dilated, (1, 1), padding), 1))(
      x.astype(jnp.float32), kernel.astype(jnp.float32))
  assert dk.dtype == jnp.bfloat16
  np.testing.assert_allclose(dk.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize('platform, convolutions, dots', [
    ('cpu', 2, 9),  # Forward and input gradient; the kernel gradient is one dot per tap.
    ('cuda', 3, 0),  # GPU and TPU keep XLA's kernel-gradient convolution.
    ('tpu', 3, 0),
])
def test_the_kernel_gradient_is_matmuls_on_cpu_only(platform, convolutions, dots):
  x, kernel = jnp.zeros((2, 16, 16, 8)), jnp.zeros((3, 3, 8, 4))
  grads = jax.jit(jax.grad(_loss(conv.conv_general_dilated, (1, 1), ((1, 1), (1, 1))), (0, 1)))
  # Lowering for a platform needs no such device.
  module = export.export(grads, platforms=[platform])(x, kernel).mlir_module()
  assert module.count('stablehlo.convolution') == convolutions
  assert module.count('stablehlo.dot_general') == dots


def test_unsupported_arguments_are_named():
  x, kernel = jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(NotImplementedError, match=r"\['rhs_dilation'\]"):
    conv.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), rhs_dilation=(2, 2),
                              dimension_numbers=NHWC)
  with pytest.raises(NotImplementedError, match='padding'):
    conv.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=NHWC)


def test_whole_model_gradients_match_xla_convolutions(monkeypatch):
  """Every conv of the network (nnx.Conv layers and the up-convs' phases) goes through it."""
  model = models.create_model(models.model_config('tiny'))
  model.eval()  # Dropout off; the convolutions are the same.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  rng = np.random.default_rng(2)
  image = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

  def grads(params):
    def loss(params):
      out = nnx.merge(graphdef, params, rest)(image)
      return jnp.sum(jnp.sin(out['depth'])) + jnp.sum(jnp.sin(out['aif']))
    return jax.grad(loss)(params)

  def num_convolutions(fn):
    return jax.jit(fn).lower(params).as_text().count('stablehlo.convolution')

  forward_convs = num_convolutions(lambda params: nnx.merge(graphdef, params, rest)(image))
  ours, our_convs = jax.jit(grads)(params), num_convolutions(grads)
  monkeypatch.setattr(conv, '_conv', conv._xla_conv)
  jax.clear_caches()  # Else jit reuses the traces made before the patch.
  ref, xla_convs = jax.jit(grads)(params), num_convolutions(grads)
  # Each forward convolution's kernel gradient became matmuls.
  assert xla_convs - our_convs == forward_convs > 20
  leaves, ref_leaves = jax.tree.leaves(ours), jax.tree.leaves(ref)
  assert len(leaves) == len(ref_leaves) > 50
  for a, b in zip(leaves, ref_leaves):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
