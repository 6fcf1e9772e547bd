"""DenseNet-121 encoder with the 2HDED:NET stem (3x3/2 conv, 4x4/2 conv instead of max-pool)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hded_jax.models import layers


class DenseLayer(nnx.Module):
  """BN-ReLU-Conv1x1(bn_size*growth)-BN-ReLU-Conv3x3(growth): the ``growth`` new features that
  the block concatenates to the layer's input."""

  def __init__(self, in_features, growth_rate, bn_size, *, formulations, dtype, rngs):
    width = bn_size * growth_rate
    self.norm1 = layers.BatchNorm(in_features, dtype=dtype, rngs=rngs)
    self.conv1 = layers.conv(in_features, width, 1, formulations=formulations, dtype=dtype,
                             rngs=rngs)
    self.norm2 = layers.BatchNorm(width, dtype=dtype, rngs=rngs)
    self.conv2 = layers.conv(width, growth_rate, 3, padding=1, formulations=formulations,
                             dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = layers.conv_output(self.conv1(jax.nn.relu(self.norm1(x))))
    return layers.conv_output(self.conv2(jax.nn.relu(self.norm2(y))))


DENSE_BLOCK_MODES = ('unrolled', 'scan')


class DenseBlock(nnx.Module):
  """Dense layers, each fed the concatenation of the block input and all earlier outputs.

  ``mode='unrolled'`` calls the layers one after the other; ``'scan'`` runs them as one
  ``lax.scan`` step, compiled once per block (``_scan``). Same parameters, same function.
  """

  def __init__(self, num_layers, in_features, growth_rate, bn_size, *, mode, remat,
               formulations, dtype, rngs):
    if mode not in DENSE_BLOCK_MODES:
      raise ValueError(f'model.dense_block={mode!r}: choose one of {DENSE_BLOCK_MODES}.')
    self.layers = nnx.List([
        DenseLayer(in_features + i * growth_rate, growth_rate, bn_size,
                   formulations=formulations, dtype=dtype, rngs=rngs)
        for i in range(num_layers)])
    self.in_features = in_features
    self.growth_rate = growth_rate
    self.out_features = in_features + num_layers * growth_rate
    self.mode = mode
    self.remat = remat

  def __call__(self, x):
    if self.mode == 'scan':
      return self._scan(x)
    # Each layer reads the block input and all earlier outputs concatenated afresh, not the
    # previous layer's concatenation: the gradient of each output is then one sum over the later
    # layers, which XLA's CPU backend computes with fewer transposing copies (docs/performance.md).
    features = [x]
    for layer in self.layers:
      features.append(layers.call(layer, jnp.concatenate(features, axis=-1), remat=self.remat))
    return jnp.concatenate(features, axis=-1)

  def _scan(self, x):
    """The layers as one scanned step over a buffer of the block's output width.

    Every layer reads the buffer's first ``out_features - growth_rate`` channels (the last
    layer's input width) and writes its new features at its own offset; channels not yet written
    are zero. Each layer's parameters and statistics are zero-padded to the last layer's shapes
    (running variance with ones) and stacked here, inside the traced step, so the parameter tree
    stays that of the unrolled block. The padding contributes nothing: the first conv's padded
    input channels have zero weights. BatchNorm statistics are per channel, so those of the real
    channels are those of the unrolled block; the padded ones are dropped.
    """
    graphdef, template = nnx.split(self.layers[-1])
    states = [_pad_to(nnx.state(layer), template) for layer in self.layers]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    offsets = self.in_features + self.growth_rate * jnp.arange(len(self.layers))
    read_width = self.out_features - self.growth_rate

    def step(buffer, state_and_offset):
      state, offset = state_and_offset
      layer = nnx.merge(graphdef, state)
      new = layer(buffer[..., :read_width]).astype(buffer.dtype)
      buffer = jax.lax.dynamic_update_slice_in_dim(buffer, new, offset, axis=3)
      return buffer, nnx.state(layer, nnx.BatchStat)

    if self.remat is not None:
      step = jax.checkpoint(step, policy=layers.remat_policy(self.remat))
    buffer = jnp.pad(x, ((0, 0),) * 3 + ((0, self.out_features - x.shape[-1]),))
    buffer, stats = jax.lax.scan(step, buffer, (stacked, offsets))
    for i, layer in enumerate(self.layers):
      own = nnx.state(layer, nnx.BatchStat)
      nnx.update(layer, jax.tree.map(lambda new, old: new[i, :old.shape[-1]], stats, own))
    return buffer


def _pad_to(state: nnx.State, template: nnx.State) -> nnx.State:
  """``state``'s arrays zero-padded at the end of each axis to ``template``'s shapes; running
  variances padded with ones."""
  def pad(path, leaf, target):
    value = 1 if any(getattr(key, 'key', None) == 'var' for key in path) else 0
    return jnp.pad(leaf, [(0, t - s) for s, t in zip(leaf.shape, target.shape)],
                   constant_values=value)
  return jax.tree_util.tree_map_with_path(pad, state, template)


class Transition(nnx.Module):
  """BN-ReLU-Conv1x1 halving the channels; pooling is left to the caller (skips are pre-pool)."""

  def __init__(self, in_features, out_features, *, formulations, dtype, rngs):
    self.norm = layers.BatchNorm(in_features, dtype=dtype, rngs=rngs)
    self.conv = layers.conv(in_features, out_features, 1, formulations=formulations,
                            dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.conv(jax.nn.relu(self.norm(x)))


class DenseNetEncoder(nnx.Module):
  """Returns the bottleneck (1/32 resolution) and the skips S0..S3 (1/2 .. 1/16)."""

  def __init__(self, *, block_sizes: Sequence[int], growth_rate: int, num_init_features: int,
               bn_size: int, dense_block: str, remat: str | None,
               formulations: layers.Formulations, dtype,
               rngs: nnx.Rngs, in_features: int = 3):
    f = num_init_features
    self.conv0 = layers.conv(in_features, f, 3, stride=2, padding=1, formulations=formulations,
                             dtype=dtype, rngs=rngs)
    self.norm0 = layers.BatchNorm(f, dtype=dtype, rngs=rngs)
    self.downconv0 = layers.conv(f, f, 4, stride=2, padding=1, formulations=formulations,
                                 dtype=dtype, rngs=rngs)
    self.norm1 = layers.BatchNorm(f, dtype=dtype, rngs=rngs)
    self.skip_features = [f]
    blocks, transitions = [], []
    for i, num_layers in enumerate(block_sizes):
      block = DenseBlock(num_layers, f, growth_rate, bn_size, mode=dense_block, remat=remat,
                         formulations=formulations, dtype=dtype, rngs=rngs)
      blocks.append(block)
      f = block.out_features
      if i < len(block_sizes) - 1:
        transitions.append(Transition(f, f // 2, formulations=formulations, dtype=dtype,
                                      rngs=rngs))
        f //= 2
        self.skip_features.append(f)
    self.denseblocks = nnx.List(blocks)
    self.transitions = nnx.List(transitions)
    self.norm5 = layers.BatchNorm(f, dtype=dtype, rngs=rngs)
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
