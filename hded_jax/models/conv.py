"""``lax.conv_general_dilated`` with a kernel gradient that is fast on XLA's CPU backend.

XLA CPU computes a convolution's kernel gradient as one more convolution whose window is the
whole output map, and runs it up to 20x slower than the forward pass (60x for the up-convs' 2x2
phase convolutions): summed over the model's convolutions, 11.6 s against 1.9 s for the forward
(batch 4, 256x256). The same sums written as one matmul per kernel tap take 2.5 s
(docs/performance.md). Other backends keep XLA's own gradient (cuDNN and TPU convolutions are
fast); ``lax.platform_dependent`` picks when lowering.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
  """Drop-in for ``lax.conv_general_dilated`` (as ``nnx.Conv(conv_general_dilated=...)``).

  Covers what the model uses: 2-D NHWC/HWIO convolutions with explicit padding, any strides,
  no dilation, one feature group, default output dtype and sharding.
  """
  expected = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _DIMENSION_NUMBERS)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  unsupported = {
      'dimension_numbers': given != expected,
      'lhs_dilation': lhs_dilation is not None and any(d != 1 for d in lhs_dilation),
      'rhs_dilation': rhs_dilation is not None and any(d != 1 for d in rhs_dilation),
      'feature_group_count': feature_group_count != 1,
      'padding': isinstance(padding, str),
      'preferred_element_type': preferred_element_type is not None,
      'out_sharding': out_sharding is not None,
  }
  if any(unsupported.values()):
    raise NotImplementedError(
        f'conv.conv_general_dilated supports NHWC/HWIO convolutions with explicit padding only; '
        f'unsupported: {[k for k, v in unsupported.items() if v]}. Use lax.conv_general_dilated.')
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)


def _xla_conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMENSION_NUMBERS, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, padding, precision):
  return _xla_conv(x, kernel, strides, padding, precision)


def _conv_fwd(x, kernel, strides, padding, precision):
  return _xla_conv(x, kernel, strides, padding, precision), (x, kernel)


def _conv_bwd(strides, padding, precision, residuals, g):
  x, kernel = residuals
  conv = functools.partial(_xla_conv, strides=strides, padding=padding, precision=precision)

  def xla_gradients(x, kernel, g):
    return jax.vjp(conv, x, kernel)[1](g)

  def cpu_gradients(x, kernel, g):
    input_gradient, = jax.vjp(lambda x: conv(x, kernel), x)[1](g)
    return input_gradient, kernel_gradient(x, g, kernel.shape, strides, padding, precision)

  return lax.platform_dependent(x, kernel, g, cpu=cpu_gradients, default=xla_gradients)


_conv.defvjp(_conv_fwd, _conv_bwd)


def kernel_gradient(x, g, kernel_shape, strides, padding, precision=None):
  """d loss / d kernel[i, j] = sum over n, h, w of x_pad[n, s*h + i, s*w + j]^T g[n, h, w].

  One matmul per tap over all positions. For stride 1 each tap shifts ``g`` onto ``x``'s grid
  (zeros where the tap falls on padding), so ``x``, usually the wider operand, is read in place.
  Strided taps slice the padded ``x`` instead: shifting ``g`` would mean dilating it, 4x the
  work at stride 2. (Concatenating the taps into one matmul ran no faster in the full train
  step and took 0.6 GiB more memory.)
  """
  kh, kw, c, d = kernel_shape
  n, h, w, _ = x.shape
  _, ho, wo, _ = g.shape
  (sh, sw), ((top, _), (left, _)) = strides, padding
  zero = jnp.zeros((), x.dtype)
  contract = functools.partial(jnp.einsum, 'pc,pd->cd', precision=precision,
                               preferred_element_type=jnp.float32)
  taps = []
  if (sh, sw) == (1, 1):
    x_flat = x.reshape(n * h * w, c)
    for i in range(kh):
      for j in range(kw):
        # Tap (i, j) pairs x[q] with g[q + (top, left) - (i, j)]; negative padding crops where
        # the tap reaches beyond x.
        shifted = lax.pad(g, zero, ((0, 0, 0), (i - top, h - ho - i + top, 0),
                                    (j - left, w - wo - j + left, 0), (0, 0, 0)))
        taps.append(contract(x_flat, shifted.reshape(n * h * w, d)))
  else:
    x_padded = lax.pad(x, zero, ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
    g_flat = g.reshape(n * ho * wo, d)
    for i in range(kh):
      for j in range(kw):
        tap = lax.slice(x_padded, (0, i, j, 0),
                        (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
        taps.append(contract(tap.reshape(n * ho * wo, c), g_flat))
  return jnp.stack(taps).reshape(kernel_shape).astype(x.dtype)
