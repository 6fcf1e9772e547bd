"""Layers initialised as the authors did, with PyTorch's padding made explicit.

XLA's ``SAME`` padding differs from PyTorch's symmetric padding for stride-2 convolutions with
even kernels or even inputs, so every padding here is spelled out: given the same weights the
network computes the same function as the PyTorch original.
"""

import dataclasses
import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Running-average decay 0.9 == PyTorch BatchNorm momentum 0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def _normal(key, shape, dtype, mean: float, stddev: float) -> jax.Array:
  """N(mean, stddev) drawn on the host by numpy, seeded with the key's bits.

  The same weights eagerly, under ``jit`` (through a host callback) and on every backend, and
  nothing to compile: ``jax.random`` would have XLA build a threefry program per parameter shape,
  which takes longer than the draw itself.
  """
  def draw(key_data):
    rng = np.random.default_rng(np.asarray(key_data).ravel().tolist())
    return rng.normal(mean, stddev, shape).astype(dtype)

  key_data = jax.random.key_data(key)
  if isinstance(key_data, jax.core.Tracer):
    return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, dtype), key_data)
  return host_array(draw(key_data))


def host_array(x: np.ndarray) -> jax.Array:
  """``x`` on the default device, made on the host. jnp.asarray (jax 0.10) and jnp.zeros or a
  device-side cast compile a program per shape."""
  return jax.device_put(x)


def conv_init(key, shape, dtype=jnp.float32):
  """N(0, 0.02), the authors' ``weights_init`` for conv weights."""
  return _normal(key, shape, dtype, 0.0, 0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
  """N(1, 0.02), the authors' ``weights_init`` for BatchNorm weights."""
  return _normal(key, shape, dtype, 1.0, 0.02)


def symmetric_padding(padding: int) -> tuple[tuple[int, int], tuple[int, int]]:
  return ((padding, padding), (padding, padding))


def conv(in_features, out_features, kernel_size, *, stride=1, padding=0,
         formulations: 'Formulations', dtype, rngs):
  """A PyTorch ``nn.Conv2d(in, out, k, stride, padding, bias=False)`` (only the network's
  up-convolutions have biases: ``UpConv``) in NHWC, computed as ``formulations`` say."""
  function = CONV_GRADIENTS[formulations.conv_gradients]
  if (formulations.pointwise_convs == 'dot' and kernel_size == 1 and stride == 1
      and padding == 0):
    function = pointwise_conv_as_dot
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
      padding=symmetric_padding(padding), use_bias=False, kernel_init=conv_init,
      conv_general_dilated=function, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _plain_nhwc(lhs, rhs, window_strides, dimension_numbers, lhs_dilation, rhs_dilation,
                feature_group_count, *, stride: int) -> bool:
  """Whether ``lax.conv_general_dilated``'s arguments ask for an NHWC convolution with ``stride``
  in both directions, without dilation or feature groups."""
  return (tuple(window_strides) == (stride, stride) and feature_group_count == 1
          and all(d in (None, (1, 1)) for d in (lhs_dilation, rhs_dilation))
          and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))


def conv_with_nhwc_gradients(lhs, rhs, window_strides, padding, *, dimension_numbers,
                             lhs_dilation=None, rhs_dilation=None, feature_group_count=1,
                             **kwargs):
  """``lax.conv_general_dilated`` with gradients that XLA's CPU backend runs fast: stride-1 NHWC
  convs (all of the model's but the stem's two) take theirs from ``_nhwc_gradient_conv``,
  stride-2 ones with an even kernel (the stem's 4x4) from ``_space_to_depth_gradient_conv``."""
  plain = functools.partial(_plain_nhwc, lhs, rhs, window_strides, dimension_numbers,
                            lhs_dilation, rhs_dilation, feature_group_count)
  if not isinstance(padding, str):
    padding = tuple(map(tuple, padding))
    if plain(stride=1):
      return _nhwc_gradient_conv(lhs, rhs, padding)
    if plain(stride=2) and rhs.shape[0] % 2 == 0 and rhs.shape[1] % 2 == 0:
      return _space_to_depth_gradient_conv(lhs, rhs, padding)
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      feature_group_count=feature_group_count, **kwargs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _nhwc_gradient_conv(x, kernel, padding):
  """A stride-1 NHWC conv whose gradients are NHWC convs too, for XLA's CPU backend.

  XLA's CPU backend runs the kernel gradient as a conv over the images with one operand's
  channels moved in front of its positions, a transposing copy, and its own choice of operand
  varies with the program around the conv; here it is always the one with fewer channels, the
  smaller copy. Inside a loop (a scanned dense block), XLA's own gradients keep layouts that
  Eigen runs two orders of magnitude slower; these do not (docs/performance.md).
  A conv with few outputs per input (the output convs, the wider up-convolutions' phases) is
  computed as ``_conv_as_shifted_products``.
  """
  kh, kw, in_features, out_features = kernel.shape
  if kh * kw > 1 and kh * kw * out_features <= in_features:
    return _conv_as_shifted_products(x, kernel, padding)
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)


def _conv_as_shifted_products(x, kernel, padding):
  """A stride-1 NHWC conv as one matrix product of each position with every tap's weights, then
  per output the sum of the products it reads, shifted. Eigen's conv copies kh * kw * in floats
  per position into the operand of a product with ``out`` columns, which for few of them is
  most of its time; this writes kh * kw * out floats per position instead.
  """
  kh, kw, in_features, out_features = kernel.shape
  weights = kernel.transpose(2, 0, 1, 3).reshape(in_features, kh * kw * out_features)
  # Summed in float32 whatever the inputs, as a conv accumulates.
  products = jnp.dot(x, weights, preferred_element_type=jnp.float32)
  products = _pad_spatially(products, padding)
  n, h, w, _ = products.shape
  rows, columns = h - kh + 1, w - kw + 1
  taps = products.reshape(n, h, w, kh, kw, out_features)
  return sum(taps[:, p:p + rows, q:q + columns, p, q]
             for p in range(kh) for q in range(kw)).astype(x.dtype)


def _nhwc_gradient_conv_fwd(x, kernel, padding):
  return _nhwc_gradient_conv(x, kernel, padding), (x, kernel)


def _nhwc_gradient_conv_bwd(padding, residuals, g):
  x, kernel = residuals
  kh, kw, in_features, out_features = kernel.shape
  (top, bottom), (left, right) = padding
  adjoint_padding = ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right))
  # The input gradient: the flipped kernel, in and out swapped, over the output gradient.
  input_gradient = jax.lax.conv_general_dilated(
      g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), (1, 1), adjoint_padding,
      dimension_numbers=_NHWC)
  if out_features < in_features:
    # Output channels as the batch, images as the features, the input as a flipped kernel.
    kernel_gradient = jax.lax.conv_general_dilated(
        _padded_channels_first(g, adjoint_padding, kernel), x.transpose(1, 2, 0, 3), (1, 1),
        'VALID', dimension_numbers=_NHWC)
    return input_gradient, jnp.flip(kernel_gradient, (1, 2)).transpose(1, 2, 3, 0)
  # Input channels as the batch, images as the features, the output gradient as the kernel.
  kernel_gradient = jax.lax.conv_general_dilated(
      _padded_channels_first(x, padding, kernel), g.transpose(1, 2, 0, 3), (1, 1), 'VALID',
      dimension_numbers=_NHWC)
  return input_gradient, kernel_gradient.transpose(1, 2, 0, 3)


def _padded_channels_first(x, padding, kernel):
  """``x`` (N, H, W, C) padded as ``padding`` says and laid out as (C, H, W, N), copied from
  ``x`` once XLA has written it.

  The kernel gradient's conv over it is then unpadded: Eigen checks every element of a padded
  conv's image-sized patches against the bounds, an eighth to a fifth of a kernel gradient's
  time. XLA's CPU backend otherwise fuses the elementwise work that made ``x`` (BatchNorm and
  ReLU, or their gradients) into the copy and recomputes it in the copy's order, reading its
  inputs C floats apart, several times slower than computing them once and copying. A
  conditional's operands are written before it runs, and XLA keeps one whose predicate is known
  only at run time: here a value of the kernel, which every device holds (one of ``x``'s,
  sharded over the batch, would cost a collective). Both branches are the same copy, so the
  predicate's value (false only for a NaN) changes nothing.
  """
  padded_channels_first = lambda x: _pad_spatially(x, padding).transpose(3, 1, 2, 0)
  first = kernel[0, 0, 0, 0]
  return jax.lax.cond(first == first, padded_channels_first, padded_channels_first, x)


def _pad_spatially(x, padding):
  """NHWC ``x`` with H and W padded by zeros as a conv's ``padding`` says (negative crops)."""
  return jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))


_nhwc_gradient_conv.defvjp(_nhwc_gradient_conv_fwd, _nhwc_gradient_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _space_to_depth_gradient_conv(x, kernel, padding):
  """A stride-2 NHWC conv with an even kernel, whose gradients are those of the same products
  written as a stride-1 conv (``_space_to_depth_conv``), for XLA's CPU backend.

  XLA's own input gradient of a stride-2 conv is a conv over the output gradient dilated with
  zeros, and its kernel gradient one with a dilated window; Eigen runs both as if the zeros were
  numbers. The forward stays the stride-2 conv, which the space-to-depth copy would only slow
  down.
  """
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), padding, dimension_numbers=_NHWC)


def _space_to_depth_gradient_conv_fwd(x, kernel, padding):
  return _space_to_depth_gradient_conv(x, kernel, padding), (x, kernel)


def _space_to_depth_gradient_conv_bwd(padding, residuals, g):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x, kernel: _space_to_depth_conv(x, kernel, padding), x, kernel)
  return vjp(g)


_space_to_depth_gradient_conv.defvjp(_space_to_depth_gradient_conv_fwd,
                                     _space_to_depth_gradient_conv_bwd)


def _space_to_depth_conv(x, kernel, padding):
  """The stride-2 conv as a stride-1 one: each 2x2 block of the padded input becomes one
  position with 4x the channels, and each 2x2 block of the kernel one tap, so that output
  (i, j) = sum over taps (p, q) of block (i + p, j + q) times kernel block (p, q)."""
  _, h, w, _ = x.shape
  kh, kw, _, out_features = kernel.shape
  (top, bottom), (left, right) = padding
  # An odd padded size's last row (column) is read by no output: cropped.
  x = _pad_spatially(x, ((top, bottom - (h + top + bottom) % 2),
                         (left, right - (w + left + right) % 2)))
  n, h, w, c = x.shape  # Even now.
  blocks = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
  kernel_blocks = kernel.reshape(kh // 2, 2, kw // 2, 2, c, out_features).transpose(
      0, 2, 1, 3, 4, 5)
  return jax.lax.conv_general_dilated(
      blocks.reshape(n, h // 2, w // 2, 4 * c),
      kernel_blocks.reshape(kh // 2, kw // 2, 4 * c, out_features), (1, 1), ((0, 0), (0, 0)),
      dimension_numbers=_NHWC)


def pointwise_conv_as_dot(lhs, rhs, window_strides, padding, *, dimension_numbers,
                          lhs_dilation=None, rhs_dilation=None, feature_group_count=1, **kwargs):
  """A 1x1, stride-1, unpadded NHWC convolution as the matrix product over the channels that it
  is: a GEMM on a GPU (cuBLAS or XLA's own kernels) instead of a cuDNN convolution, which XLA
  autotunes once per distinct shape when it compiles (docs/performance.md)."""
  if (tuple(rhs.shape[:2]) != (1, 1) or any(tuple(p) != (0, 0) for p in padding)
      or not _plain_nhwc(lhs, rhs, window_strides, dimension_numbers, lhs_dilation, rhs_dilation,
                         feature_group_count, stride=1)):
    raise ValueError('pointwise_conv_as_dot computes 1x1, stride-1, unpadded NHWC convolutions '
                     f'only; got kernel {rhs.shape}, strides {window_strides}, padding {padding}.')
  return jax.lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), **kwargs)


class UpConv(nnx.Module):
  """PyTorch ``nn.ConvTranspose2d(in, out, 4, stride=2, padding=1)``: doubles H and W.

  ``kernel`` (4, 4, in, out) is the plain conv kernel that a transposed conv applies to the
  stride-dilated input padded by ``k - 1 - p`` = 2 (what ``nnx.ConvTranspose`` with that padding
  computes); importing PyTorch weights (in, out, kh, kw) means transposing to (kh, kw, in, out)
  and flipping both spatial axes. Computed as ``formulations.up_conv`` says (``UP_CONVS``), from
  convolutions whose gradients ``formulations.conv_gradients`` chooses.
  """

  def __init__(self, in_features, out_features, *, formulations: 'Formulations', dtype, rngs):
    self.kernel = nnx.Param(conv_init(rngs.params(), (4, 4, in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.mode = formulations.up_conv
    self.conv_gradients = formulations.conv_gradients
    self.dtype = dtype

  def __call__(self, x):
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    return (UP_CONVS[self.mode](x, kernel, CONV_GRADIENTS[self.conv_gradients])
            + self.bias[...].astype(self.dtype))


def _conv_transpose(x, kernel, conv=jax.lax.conv_general_dilated):
  """``lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)))``."""
  return conv(x, kernel, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_NHWC)


def _conv_transpose_adjoint(g, kernel, conv=jax.lax.conv_general_dilated):
  """The stride-2 conv that the up-convolution is the adjoint of: its input gradient."""
  return conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), (2, 2), ((1, 1), (1, 1)),
              dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose_strided_grads(x, kernel, conv=jax.lax.conv_general_dilated):
  """One ``conv_transpose`` whose kernel gradient is that of the stride-2 conv it is the adjoint
  of (``<conv_transpose(x, k), g> = <x, adjoint(g, k)>``, so both have the same derivative in
  k). JAX's own kernel gradient of ``conv_transpose`` is a convolution with a reversed window the
  size of the image, which XLA's GPU backend cannot hand cuDNN as a kernel gradient: on an H100
  they were the step's slowest kernels. A stride-2 conv's kernel gradient has no reversed
  window."""
  return _conv_transpose(x, kernel, conv)


def _conv_transpose_strided_grads_fwd(x, kernel, conv):
  return _conv_transpose(x, kernel, conv), (x, kernel)


def _conv_transpose_strided_grads_bwd(conv, residuals, g):
  x, kernel = residuals
  input_gradient, kernel_vjp = jax.vjp(
      lambda kernel: _conv_transpose_adjoint(g, kernel, conv), kernel)
  return input_gradient, *kernel_vjp(x)


_conv_transpose_strided_grads.defvjp(_conv_transpose_strided_grads_fwd,
                                     _conv_transpose_strided_grads_bwd)


def _phase_convs(x, kernel, conv):
  """The transposed conv as four 2x2 convs, one per output phase: the same function without
  the dilated input's zeros, which XLA's CPU backend would multiply too: the model's up-convs
  run an order of magnitude faster that way than as ``conv_transpose``."""
  # Output row 2i + a sees input rows (i - 1, i) through taps (0, 2) for a = 0, and rows
  # (i, i + 1) through taps (1, 3) for a = 1; likewise for columns.
  phases = [[conv(x, kernel[a::2, b::2], (1, 1), ((1 - a, a), (1 - b, b)),
                  dimension_numbers=_NHWC) for b in (0, 1)] for a in (0, 1)]
  return _interleave_phases(phases)


def _phase_channel_conv(x, kernel, conv):
  """The four phases of ``_phase_convs`` as the output channels of one 2x2 conv over the input
  padded by one all round: phase (a, b) of output (i, j) is that conv's output (i + a, j + b),
  which sees input rows (i - 1 + a, i + a) and columns likewise. One convolution per
  up-convolution instead of four, holding less memory than the phases compiled for a GPU, for
  (1 + 1/h)(1 + 1/w) of the phases' products. (XLA's GPU rewrites merge the phases' shapes too,
  so both leave its autotuner the same convolutions.)"""
  _, h, w, _ = x.shape
  out_features = kernel.shape[-1]
  kernels = jnp.concatenate([kernel[a::2, b::2] for a in (0, 1) for b in (0, 1)], axis=-1)
  y = conv(x, kernels, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
  channels = lambda a, b: slice((2 * a + b) * out_features, (2 * a + b + 1) * out_features)
  return _interleave_phases([[y[:, a:a + h, b:b + w, channels(a, b)] for b in (0, 1)]
                             for a in (0, 1)])


def _interleave_phases(phases):
  """[[phase (a, b) for b] for a] of shape (n, h, w, c) -> the (n, 2h, 2w, c) output."""
  n, h, w, c = phases[0][0].shape
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (n, h, a, w, b, c)
  return y.reshape(n, 2 * h, 2 * w, c)


def _upsampling_conv(phases):
  """The up-convolution as ``phases(x, kernel, conv)`` computes it, with a custom gradient:
  the input gradient, the adjoint of a stride-2 transposed conv, is one stride-2 conv instead
  of the phases' four (faster on the CPU); the kernel gradient is that of ``phases``. With the
  CPU's conv gradients, where the kernel is larger than the output gradient's windows, both
  gradients are matrix products instead (``_upsampling_conv_gradients_as_products``)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
  def up_conv(x, kernel, conv=jax.lax.conv_general_dilated):
    return phases(x, kernel, conv)

  def forward(x, kernel, conv):
    return phases(x, kernel, conv), (x, kernel)

  def backward(conv, residuals, g):
    x, kernel = residuals
    n, h, w, in_features = x.shape
    if conv is conv_with_nhwc_gradients and in_features > n * h * w:
      return _upsampling_conv_gradients_as_products(x, kernel, g)
    input_gradient = _conv_transpose_adjoint(g, kernel, conv)
    _, kernel_vjp = jax.vjp(lambda kernel: phases(x, kernel, conv), kernel)
    return input_gradient, *kernel_vjp(g)

  up_conv.defvjp(forward, backward)
  return up_conv


def _upsampling_conv_gradients_as_products(x, kernel, g):
  """Both gradients of the up-convolution as matrix products with the output gradient's 4x4
  windows, one per input position, for XLA's CPU backend where the kernel is larger than those
  windows (more input channels than input positions: the first up-convolution at 256x256,
  batch 4). Its convolutions would copy the kernel, transposed, and pad each phase's kernel
  gradient to the full kernel.

  Input (i, j) reaches output (2i + 2 - p, 2j + 2 - q) through tap (p, q).
  """
  n, h, w, in_features = x.shape
  out_features = kernel.shape[-1]
  # In float32 whatever the inputs, as a conv accumulates (XLA's CPU matrix products take no
  # bfloat16 operands with a float32 result).
  as_float32 = lambda a: jnp.asarray(a, jnp.promote_types(a.dtype, jnp.float32))
  padded = _pad_spatially(as_float32(g), ((1, 1), (1, 1)))
  windows = jnp.stack([padded[:, 3 - p:3 - p + 2 * h:2, 3 - q:3 - q + 2 * w:2]
                       for p in range(4) for q in range(4)], axis=3)
  windows = windows.reshape(n * h * w, 16, out_features)
  input_gradient = jax.lax.dot_general(
      windows, as_float32(kernel).reshape(16, in_features, out_features),
      (((1, 2), (0, 2)), ((), ())))
  kernel_gradient = jax.lax.dot_general(
      as_float32(x).reshape(n * h * w, in_features), windows, (((0,), (0,)), ((), ())))
  return (input_gradient.reshape(x.shape).astype(x.dtype),
          kernel_gradient.transpose(1, 0, 2).reshape(kernel.shape).astype(kernel.dtype))


# Ways to compute the same functions: XLA's own, one that XLA's CPU backend runs faster, and
# one that XLA's GPU backend compiles faster (docs/performance.md). ``formulations`` says which
# one 'auto' picks on a platform.
CONV_GRADIENTS = {'xla': jax.lax.conv_general_dilated, 'nhwc': conv_with_nhwc_gradients}
# Each up-convolution is (x, kernel, conv): ``conv``, one of ``CONV_GRADIENTS``, computes the
# convolutions it is made of.
UP_CONVS = {'transpose': _conv_transpose, 'phases': _upsampling_conv(_phase_convs),
            'phase_channels': _upsampling_conv(_phase_channel_conv),
            'transpose_strided_grads': _conv_transpose_strided_grads}
# The 1x1 convolutions (dense layers, transitions) as convolutions or as matrix products.
POINTWISE_CONVS = ('conv', 'dot')
_FORMULATIONS = {'conv_gradients': CONV_GRADIENTS, 'up_conv': UP_CONVS,
                 'pointwise_convs': POINTWISE_CONVS}
# What 'auto' is: the fastest measured on the CPU (2-core Intel and AMD VMs) and on a GPU (H100,
# H200: the 1x1 convolutions as matrix products, on cuBLAS (runtime.use_cublas_gemms), compile
# in less than half the time; the phases step faster than one conv_transpose, whose kernel
# gradients cuDNN computes as convolutions with image-sized windows). Other platforms (TPU)
# compute with XLA's own. Figures: docs/performance.md.
_AUTO_FORMULATIONS = {
    'cpu': {'conv_gradients': 'nhwc', 'up_conv': 'phases', 'pointwise_convs': 'conv'},
    'gpu': {'conv_gradients': 'xla', 'up_conv': 'phases', 'pointwise_convs': 'dot'},
    'other': {'conv_gradients': 'xla', 'up_conv': 'transpose', 'pointwise_convs': 'conv'},
}
# JAX's names for GPU platforms: the backend's and jax.export's.
_GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


@dataclasses.dataclass(frozen=True)
class Formulations:
  """How the model computes its convolutions, one ``_FORMULATIONS`` mode per option."""
  up_conv: str
  conv_gradients: str
  pointwise_convs: str


def formulations(config, platform: str) -> Formulations:
  """The formulations that the model config ``config`` asks for on ``platform`` (a JAX platform
  name: 'cpu', 'gpu', 'cuda', 'tpu', ...): 'auto' (also where a config saved before the option
  lacks it) is the one measured fastest there (``_AUTO_FORMULATIONS``).

  Chosen when the model is built rather than inside the program by ``lax.platform_dependent``,
  which traces both formulations of every convolution, lengthening every trace and lowering.
  """
  def resolve(option):
    mode = config.get(option, 'auto')
    if mode == 'auto':
      kind = ('cpu' if platform == 'cpu' else 'gpu' if platform in _GPU_PLATFORMS else 'other')
      return _AUTO_FORMULATIONS[kind][option]
    if mode not in _FORMULATIONS[option]:
      raise ValueError(f'model.{option}={mode!r}: choose "auto" or one of '
                       f'{sorted(_FORMULATIONS[option])}.')
    return mode
  return Formulations(**{option: resolve(option) for option in _FORMULATIONS})


def _batch_statistics(x):
  """Per-channel mean and variance over all other axes, in float32 at least, as
  E[x^2] - E[x]^2 (one pass over x), as ``nnx.BatchNorm`` computes them."""
  stats_x = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = stats_x.mean(axes)
  var = jnp.maximum(0.0, jax.lax.square(stats_x).mean(axes) - jax.lax.square(mean))
  return mean, var


def _normalize(x, mean, inv_std, scale, bias):
  """``nnx.BatchNorm``'s output: per-channel terms shaped (1, 1, 1, C), as flax shapes them."""
  mean, inv_std, scale, bias = (v.reshape((1,) * (x.ndim - 1) + v.shape)
                                for v in (mean, inv_std, scale, bias))
  return jnp.asarray((x - mean) * (inv_std * scale) + bias, x.dtype)


@jax.custom_vjp
def batch_norm_train(x, scale, bias):
  """Training-mode BatchNorm: ``(y, batch mean, batch variance)``.

  The forward pass is ``nnx.BatchNorm``'s, bit for bit. The backward pass is the closed form
  (two reductions and one elementwise pass, as cuDNN and PyTorch compute it) rather than the
  derivative of the statistics traced through: for the full train step XLA's CPU compiler then
  builds a quarter fewer kernels, and the step runs faster (docs/performance.md).
  """
  return _batch_norm_train_fwd(x, scale, bias)[0]


def _batch_norm_train_fwd(x, scale, bias):
  mean, var = _batch_statistics(x)
  inv_std = jax.lax.rsqrt(var + BN_EPSILON)
  return (_normalize(x, mean, inv_std, scale, bias), mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_bwd(residuals, cotangents):
  # The statistics' cotangents are dropped: they only feed the running averages.
  x, mean, inv_std, scale = residuals
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  axes = tuple(range(x.ndim - 1))
  g = jnp.asarray(cotangents[0], dtype)
  x_hat = (jnp.asarray(x, dtype) - mean) * inv_std
  d_bias = g.sum(axes)
  d_scale = (g * x_hat).sum(axes)
  count = x.size // x.shape[-1]
  dx = (jnp.asarray(scale, dtype) * inv_std) * (g - (d_bias + x_hat * d_scale) / count)
  return (jnp.asarray(dx, x.dtype), jnp.asarray(d_scale, scale.dtype),
          jnp.asarray(d_bias, scale.dtype))


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
  """``nnx.BatchNorm`` (momentum ``BN_MOMENTUM``, the authors' scale init): the same outputs and
  running statistics bit for bit, with the running statistics replaced rather than assigned in
  place, and the closed-form gradient of `batch_norm_train`.

  Flax's in-place assignment compares the new value's sharding with the old one's; under
  ``jit`` both are tracers, and the AttributeError JAX raises for a tracer's sharding first walks
  the whole program traced so far to say where the value came from. Four walks per layer made
  tracing the full train step several times slower, which every backend pays before each
  compile.
  """

  def __init__(self, num_features: int, *, dtype, rngs: nnx.Rngs):
    shape = (num_features,)
    self.scale = nnx.Param(bn_scale_init(rngs.params(), shape))
    rngs.params()  # nnx.BatchNorm draws a key for the bias too; the next layers' keys follow.
    self.bias = nnx.Param(host_array(np.zeros(shape, np.float32)))
    self.mean = nnx.BatchStat(host_array(np.zeros(shape, np.float32)))
    self.var = nnx.BatchStat(host_array(np.ones(shape, np.float32)))
    self.dtype = dtype
    self.use_running_average = False  # Set by Module.train() / Module.eval().

  def __call__(self, x):
    x, scale, bias = (jnp.asarray(v, self.dtype) for v in (x, self.scale.value, self.bias.value))
    if self.use_running_average:
      mean, var = (jnp.asarray(v, self.dtype) for v in (self.mean.value, self.var.value))
      return _normalize(x, mean, jax.lax.rsqrt(var + BN_EPSILON), scale, bias)
    y, mean, var = batch_norm_train(x, scale, bias)
    self.mean.value = BN_MOMENTUM * self.mean.value + (1 - BN_MOMENTUM) * mean
    self.var.value = BN_MOMENTUM * self.var.value + (1 - BN_MOMENTUM) * var
    return y


# What a rematerialised layer keeps from its forward pass besides its inputs: 'nothing'
# (recompute everything, convolutions included) or 'conv_outputs' (recompute only BatchNorm,
# ReLU and dropout, which are elementwise). Residual sizes: docs/performance.md.
REMAT_POLICIES = {
    'nothing': jax.checkpoint_policies.nothing_saveable,
    'conv_outputs': jax.checkpoint_policies.save_only_these_names('conv_output'),
}


def conv_output(x):
  """Names a convolution's output for the 'conv_outputs' remat policy."""
  return checkpoint_name(x, 'conv_output')


def remat_policy(remat: str | None):
  if remat not in (None, *REMAT_POLICIES):
    raise ValueError(f'model.remat_policy={remat!r}: choose one of {sorted(REMAT_POLICIES)}.')
  return REMAT_POLICIES.get(remat)


def call(module, *args, remat: str | None):
  """``module(*args)``; with ``remat`` (a ``REMAT_POLICIES`` name) its activations are
  recomputed in the backward pass instead of kept from the forward."""
  if remat is None:
    return module(*args)
  return nnx.remat(lambda module, *args: module(*args), policy=remat_policy(remat))(
      module, *args)


leaky_relu = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)


def avg_pool_2x2(x):
  return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
