"""Layers initialised as the authors did, with PyTorch's padding made explicit.

XLA's ``SAME`` padding differs from PyTorch's symmetric padding for stride-2 convolutions with
even kernels or even inputs, so every padding here is spelled out: given the same weights the
network computes the same function as the PyTorch original.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Running-average decay 0.9 == PyTorch BatchNorm momentum 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _normal(key, shape, dtype, mean: float, stddev: float) -> jax.Array:
  """N(mean, stddev). Concrete keys draw on the host with numpy: XLA compiles one random
  program per parameter shape (~0.5 s each on a small CPU), which made building even the tiny
  model take ~40 s. Under tracing (jit, eval_shape) it is plain jax.random."""
  if isinstance(key, jax.core.Tracer):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
  # Cast on the host: a device-side cast would compile once per shape too.
  return jnp.asarray(np.random.default_rng(seed).normal(mean, stddev, shape).astype(dtype))


def conv_init(key, shape, dtype=jnp.float32):
  """N(0, 0.02), the authors' ``weights_init`` for conv weights."""
  return _normal(key, shape, dtype, 0.0, 0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02), the authors' ``weights_init`` for BatchNorm weights."""
  return _normal(key, shape, dtype, 1.0, 0.02)


def symmetric_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((padding, padding), (padding, padding))


def conv(in_features, out_features, kernel_size, *, stride=1, padding=0, use_bias=False,
         dtype, rngs):
  """A PyTorch ``nn.Conv2d(in, out, k, stride, padding)`` in NHWC."""
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=symmetric_padding(padding), use_bias=use_bias, kernel_init=conv_init,
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class UpConv(nnx.Module):
  """PyTorch ``nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)``: doubles H and W.

  ``kernel`` (4, 4, in, out) is the plain conv kernel that a transposed conv applies to the
  stride-dilated input padded by ``k - 1 - p`` = 2 (what ``nnx.ConvTranspose`` with that padding
  computes); importing PyTorch weights (in, out, kh, kw) means transposing to (kh, kw, in, out)
  and flipping both spatial axes. Computed by ``upsampling_conv``.
  """

  def __init__(self, in_features, out_features, *, dtype, rngs):
    self.kernel = nnx.Param(conv_init(rngs.params(), (4, 4, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    return upsampling_conv(x, kernel) + self.bias[...].astype(self.dtype)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def upsampling_conv(x, kernel):
  """``lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)))``: one transposed conv on GPU
  and TPU, four phase convs on CPU (``_phase_upsampling_conv``)."""
  return jax.lax.platform_dependent(x, kernel, cpu=_phase_upsampling_conv,
                                    default=_conv_transpose)


def _conv_transpose(x, kernel):
  return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_NHWC)


@jax.custom_vjp
def _phase_upsampling_conv(x, kernel):
  """The transposed conv as four 2x2 convs, one per output phase: the same function without
  the dilated input's zeros. XLA's CPU backend runs forward and backward of the model's up-convs
  20x faster that way than ``conv_transpose`` (whose kernel gradient is 30-70x slower). The
  input gradient, the adjoint of a stride-2 transposed conv, is one stride-2 conv instead of the
  four phases' (at 128x128 on CPU, 113 against 159 ms; docs/performance.md).
  """
  return _phase_convs(x, kernel)


def _phase_convs(x, kernel):
  n, h, w, _ = x.shape
  # Output row 2i + a sees input rows (i - 1, i) through taps (0, 2) for a = 0, and rows
  # (i, i + 1) through taps (1, 3) for a = 1; likewise for columns.
  phases = [[jax.lax.conv_general_dilated(
      x, kernel[a::2, b::2], window_strides=(1, 1), padding=((1 - a, a), (1 - b, b)),
      dimension_numbers=_NHWC) for b in (0, 1)] for a in (0, 1)]
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (n, h, a, w, b, c)
  return y.reshape(n, 2 * h, 2 * w, -1)


def _upsampling_conv_fwd(x, kernel):
  return _phase_convs(x, kernel), (x, kernel)


def _upsampling_conv_bwd(residuals, g):
  x, kernel = residuals
  input_gradient = jax.lax.conv_general_dilated(
      g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), window_strides=(2, 2),
      padding=((1, 1), (1, 1)), dimension_numbers=_NHWC)
  _, kernel_vjp = jax.vjp(lambda kernel: _phase_convs(x, kernel), kernel)
  return input_gradient, *kernel_vjp(g)


_phase_upsampling_conv.defvjp(_upsampling_conv_fwd, _upsampling_conv_bwd)


def batch_norm(num_features, *, dtype, rngs):
  return nnx.BatchNorm(
      num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale_init=bn_scale_init,
      dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def call(module, *args, remat: bool):
  """``module(*args)``; with ``remat`` its activations are recomputed in the backward pass
  instead of kept from the forward (full model: 13% less memory, 14% more FLOPs)."""
  if not remat:
    return module(*args)
  return nnx.remat(lambda module, *args: module(*args))(module, *args)


leaky_relu = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)


def avg_pool_2x2(x):
  return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
