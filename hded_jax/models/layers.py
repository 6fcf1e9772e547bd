"""Layers initialised as the authors did, with PyTorch's padding made explicit.

XLA's ``SAME`` padding differs from PyTorch's symmetric padding for stride-2 convolutions with
even kernels or even inputs, so every padding here is spelled out: given the same weights the
network computes the same function as the PyTorch original.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# Running-average decay 0.9 == PyTorch BatchNorm momentum 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

conv_init = nnx.initializers.normal(stddev=0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02), the authors' ``weights_init`` for BatchNorm weights."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def symmetric_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((padding, padding), (padding, padding))


def conv(in_features, out_features, kernel_size, *, stride=1, padding=0, use_bias=False,
         dtype, rngs):
  """A PyTorch ``nn.Conv2d(in, out, k, stride, padding)`` in NHWC."""
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=symmetric_padding(padding), use_bias=use_bias, kernel_init=conv_init,
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def conv_transpose(in_features, out_features, *, dtype, rngs):
  """PyTorch ``nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)``: doubles H and W.

  A transposed conv is a conv over the stride-dilated input padded by ``k - 1 - p`` = 2 on each
  side. The kernel is stored as a plain (not flipped) HWIO conv kernel: importing PyTorch weights
  (``in, out, kh, kw``) means transposing to ``kh, kw, in, out`` and flipping both spatial axes.
  """
  return nnx.ConvTranspose(
      in_features, out_features, (4, 4), strides=(2, 2), padding=symmetric_padding(2),
      use_bias=True, kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def batch_norm(num_features, *, dtype, rngs):
  return nnx.BatchNorm(
      num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale_init=bn_scale_init,
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


leaky_relu = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)


def avg_pool_2x2(x):
  return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
