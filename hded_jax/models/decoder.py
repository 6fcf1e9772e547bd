"""D3-Net decoder: five up-sampling blocks with U-Net skips and a 3x3 output conv."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hded_jax.models import layers


class DecoderBlock(nnx.Module):
  """ConvT4x4/2 -> BN -> [Dropout] -> ReLU -> Conv3x3 -> BN -> [Dropout] -> ReLU."""

  def __init__(self, in_features, out_features, *, dropout_rate, formulations, dtype, rngs):
    self.conv1 = layers.UpConv(in_features, out_features, formulations=formulations, dtype=dtype,
                               rngs=rngs)
    self.bn1 = layers.BatchNorm(out_features, dtype=dtype, rngs=rngs)
    self.conv2 = layers.conv(out_features, out_features, 3, padding=1, formulations=formulations,
                             dtype=dtype, rngs=rngs)
    self.bn2 = layers.BatchNorm(out_features, dtype=dtype, rngs=rngs)
    # Dropout keys come with each call (see HDEDNet.__call__), so the state holds no RNG.
    self.dropout = nnx.Dropout(dropout_rate) if dropout_rate else None

  def _dropout(self, x, rngs):
    return self.dropout(x, rngs=rngs) if self.dropout is not None else x

  def __call__(self, x, rngs=None):
    x = jax.nn.relu(self._dropout(self.bn1(layers.conv_output(self.conv1(x))), rngs))
    return jax.nn.relu(self._dropout(self.bn2(layers.conv_output(self.conv2(x))), rngs))


class Decoder(nnx.Module):
  """Up-samples the bottleneck back to input resolution, concatenating (skip, features).

  Block widths follow the encoder: block k outputs as many channels as the skip it is
  concatenated with next (512, 256, 128, 64 for DenseNet-121), the last one as many as S0.
  Dropout only in the two deepest blocks (d5, d4), as in D3-Net.
  """

  def __init__(self, *, bottleneck_features: int, skip_features: Sequence[int],
               out_channels: int, dropout_rate: float, formulations: layers.Formulations,
               remat: str | None, dtype, rngs: nnx.Rngs):
    skips = list(skip_features)  # S0..S3
    widths = skips[::-1] + [skips[0]]  # d5: S3's width, d4: S2's, ..., d2 and d1: S0's.
    blocks = []
    in_features = bottleneck_features
    for i, width in enumerate(widths):
      blocks.append(DecoderBlock(in_features, width,
                                 dropout_rate=dropout_rate if i < 2 else 0.0,
                                 formulations=formulations, dtype=dtype,
                                 rngs=rngs))
      if i < len(skips):
        in_features = width + skips[len(skips) - 1 - i]
    self.blocks = nnx.List(blocks)
    self.last_conv = layers.conv(widths[-1], out_channels, 3, padding=1,
                                 formulations=formulations, dtype=dtype, rngs=rngs)
    self.remat = remat

  def __call__(self, bottleneck, skips, rngs=None):
    x = bottleneck
    for i, block in enumerate(self.blocks):
      x = layers.call(block, x, rngs, remat=self.remat)
      if i < len(skips):
        x = jnp.concatenate([skips[len(skips) - 1 - i], x], axis=-1)
    return self.last_conv(x)
