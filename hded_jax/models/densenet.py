"""DenseNet-121 encoder with the 2HDED:NET stem (3x3/2 conv, 4x4/2 conv instead of max-pool)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hded_jax.models import layers


class DenseLayer(nnx.Module):
  """BN-ReLU-Conv1x1(bn_size*growth)-BN-ReLU-Conv3x3(growth), concatenated to its input."""

  def __init__(self, in_features, growth_rate, bn_size, *, dtype, rngs):
    width = bn_size * growth_rate
    self.norm1 = layers.batch_norm(in_features, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_features, width, 1, dtype=dtype, rngs=rngs)
    self.norm2 = layers.batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = layers.conv(width, growth_rate, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = self.conv1(jax.nn.relu(self.norm1(x)))
    y = self.conv2(jax.nn.relu(self.norm2(y)))
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nnx.Module):

  def __init__(self, num_layers, in_features, growth_rate, bn_size, *, remat, dtype, rngs):
    self.layers = nnx.List([
        DenseLayer(in_features + i * growth_rate, growth_rate, bn_size, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.out_features = in_features + num_layers * growth_rate
    self.remat = remat

  def __call__(self, x):
    for layer in self.layers:
      x = layers.call(layer, x, remat=self.remat)
    return x


class Transition(nnx.Module):
  """BN-ReLU-Conv1x1 halving the channels; pooling is left to the caller (skips are pre-pool)."""

  def __init__(self, in_features, out_features, *, dtype, rngs):
    self.norm = layers.batch_norm(in_features, dtype=dtype, rngs=rngs)
    self.conv = layers.conv(in_features, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(jax.nn.relu(self.norm(x)))


class DenseNetEncoder(nnx.Module):
  """Returns the bottleneck (1/32 resolution) and the skips S0..S3 (1/2 .. 1/16)."""

  def __init__(self, *, block_sizes: Sequence[int], growth_rate: int, num_init_features: int,
               bn_size: int, remat: bool, dtype, rngs: nnx.Rngs, in_features: int = 3):
    f = num_init_features
    self.conv0 = layers.conv(in_features, f, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
    self.norm0 = layers.batch_norm(f, dtype=dtype, rngs=rngs)
    self.downconv0 = layers.conv(f, f, 4, stride=2, padding=1, dtype=dtype, rngs=rngs)
    self.norm1 = layers.batch_norm(f, dtype=dtype, rngs=rngs)
    self.skip_features = [f]
    blocks, transitions = [], []
    for i, num_layers in enumerate(block_sizes):
      block = DenseBlock(num_layers, f, growth_rate, bn_size, remat=remat, dtype=dtype,
                         rngs=rngs)
      blocks.append(block)
      f = block.out_features
      if i < len(block_sizes) - 1:
        transitions.append(Transition(f, f // 2, dtype=dtype, rngs=rngs))
        f //= 2
        self.skip_features.append(f)
    self.denseblocks = nnx.List(blocks)
    self.transitions = nnx.List(transitions)
    self.norm5 = layers.batch_norm(f, dtype=dtype, rngs=rngs)
    self.out_features = f

  def __call__(self, x):
    x = layers.leaky_relu(self.norm0(self.conv0(x)))
    skips = [x]
    x = layers.leaky_relu(self.norm1(self.downconv0(x)))
    for block, transition in zip(self.denseblocks, self.transitions):
      x = transition(block(x))
      skips.append(x)
      x = layers.avg_pool_2x2(x)
    x = self.denseblocks[-1](x)
    x = layers.leaky_relu(self.norm5(x))
    return x, skips
