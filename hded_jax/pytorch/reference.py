"""PyTorch 2HDED:NET with the official checkpoint's module names: the converter's parity tests
and the benchmark's PyTorch baseline. Needs the `torch` extra.

Written from the paper and the official layer layout (docs/model.md) independently of the JAX
model (NCHW, PyTorch's own padding semantics), so that matching outputs check the converter's
layout changes and the JAX model's padding alike.
"""

import torch
from torch import nn
from torch.nn import functional as F


class DenseLayer(nn.Module):

  def __init__(self, in_features, growth_rate, bn_size):
    super().__init__()
    self.norm1 = nn.BatchNorm2d(in_features)
    self.conv1 = nn.Conv2d(in_features, bn_size * growth_rate, 1, bias=False)
    self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
    self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

  def forward(self, x):
    y = self.conv1(F.relu(self.norm1(x)))
    return torch.cat([x, self.conv2(F.relu(self.norm2(y)))], 1)


class Transition(nn.Module):

  def __init__(self, in_features, out_features):
    super().__init__()
    self.norm = nn.BatchNorm2d(in_features)
    self.conv = nn.Conv2d(in_features, out_features, 1, bias=False)

  def forward(self, x):
    return self.conv(F.relu(self.norm(x)))


class Features(nn.Module):
  """DenseNet body with the 2HDED:NET stem; returns the bottleneck and skips S0..S3."""

  def __init__(self, block_sizes, growth_rate, num_init_features, bn_size):
    super().__init__()
    f = num_init_features
    self.conv0 = nn.Conv2d(3, f, 3, stride=2, padding=1, bias=False)
    self.norm0 = nn.BatchNorm2d(f)
    self.downconv0 = nn.Conv2d(f, f, 4, stride=2, padding=1, bias=False)
    self.norm1 = nn.BatchNorm2d(f)
    self.num_blocks = len(block_sizes)
    self.skip_features = [f]
    for i, n in enumerate(block_sizes):
      block = nn.Sequential()
      for j in range(n):
        block.add_module(f'denselayer{j + 1}', DenseLayer(f + j * growth_rate, growth_rate,
                                                          bn_size))
      self.add_module(f'denseblock{i + 1}', block)
      f += n * growth_rate
      if i < len(block_sizes) - 1:
        self.add_module(f'transition{i + 1}', Transition(f, f // 2))
        f //= 2
        self.skip_features.append(f)
    self.norm5 = nn.BatchNorm2d(f)
    self.out_features = f

  def forward(self, x):
    x = F.leaky_relu(self.norm0(self.conv0(x)), 0.2)
    skips = [x]
    x = F.leaky_relu(self.norm1(self.downconv0(x)), 0.2)
    for i in range(1, self.num_blocks):
      x = getattr(self, f'transition{i}')(getattr(self, f'denseblock{i}')(x))
      skips.append(x)
      x = F.avg_pool2d(x, 2)
    x = getattr(self, f'denseblock{self.num_blocks}')(x)
    return F.leaky_relu(self.norm5(x), 0.2), skips


class DecoderBlock(nn.Module):

  def __init__(self, in_features, out_features, dropout):
    super().__init__()
    self.conv1 = nn.ConvTranspose2d(in_features, out_features, 4, stride=2, padding=1)
    self.bn1 = nn.BatchNorm2d(out_features)
    self.conv2 = nn.Conv2d(out_features, out_features, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_features)
    self.dropout = nn.Dropout(0.5) if dropout else nn.Identity()

  def forward(self, x):
    x = F.relu(self.dropout(self.bn1(self.conv1(x))))
    return F.relu(self.dropout(self.bn2(self.conv2(x))))


def _decoder_blocks(bottleneck_features, skip_features):
  """(in, out, dropout) of d5..d1."""
  s0, s1, s2, s3 = skip_features
  return [(bottleneck_features, s3, True), (2 * s3, s2, True), (2 * s2, s1, False),
          (2 * s1, s0, False), (2 * s0, s0, False)]


class Module(nn.Module):
  """A bare container, so that state-dict keys follow the official attribute names."""


class HDEDNet(nn.Module):
  """Official layout: `decoder.d_block{5,4,3}.0`, `decoder_tasks.0.d_block{2,1}.0`,
  `decoder_tasks.0.last_conv`, `decoder_aif.d_aif_block{5..1}.0`, `decoder_aif.last_aif_conv`.
  """

  def __init__(self, block_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64,
               bn_size=4, heads=('depth', 'aif')):
    super().__init__()
    self.features = Features(block_sizes, growth_rate, num_init_features, bn_size)
    specs = _decoder_blocks(self.features.out_features, self.features.skip_features)
    self.heads = heads
    if 'depth' in heads:
      self.decoder = Module()
      task = Module()
      for d, spec in zip(range(5, 0, -1), specs):
        parent = self.decoder if d >= 3 else task
        parent.add_module(f'd_block{d}', nn.Sequential(DecoderBlock(*spec)))
      task.last_conv = nn.Conv2d(specs[-1][1], 1, 3, padding=1, bias=False)
      self.decoder_tasks = nn.ModuleList([task])
    if 'aif' in heads:
      self.decoder_aif = Module()
      for d, spec in zip(range(5, 0, -1), specs):
        self.decoder_aif.add_module(f'd_aif_block{d}', nn.Sequential(DecoderBlock(*spec)))
      self.decoder_aif.last_aif_conv = nn.Conv2d(specs[-1][1], 3, 3, padding=1, bias=False)

  @staticmethod
  def _decode(blocks, last_conv, x, skips):
    for block, skip in zip(blocks, [*skips[::-1], None]):
      x = block(x)
      if skip is not None:
        x = torch.cat([skip, x], 1)
    return last_conv(x)

  def forward(self, image):
    x, skips = self.features(image)
    out = {}
    if 'depth' in self.heads:
      task = self.decoder_tasks[0]
      blocks = [self.decoder.d_block5, self.decoder.d_block4, self.decoder.d_block3,
                task.d_block2, task.d_block1]
      out['depth'] = self._decode(blocks, task.last_conv, x, skips)[:, 0]
    if 'aif' in self.heads:
      blocks = [getattr(self.decoder_aif, f'd_aif_block{d}') for d in range(5, 0, -1)]
      out['aif'] = self._decode(blocks, self.decoder_aif.last_aif_conv, x, skips) + image
    return out


# The loss terms of `hded_jax.losses` that the reference implements (what the benchmark times).
LOSS_TERMS = {
    'depth_l1': lambda out, batch, eps: F.l1_loss(out['depth'], batch['depth']),
    'aif_l1': lambda out, batch, eps: F.l1_loss(out['aif'], batch['aif']),
    'depth_charbonnier': lambda out, batch, eps: torch.sqrt(
        (out['depth'] - batch['depth'])**2 + eps).mean(),
    'aif_charbonnier': lambda out, batch, eps: torch.sqrt(
        (out['aif'] - batch['aif'])**2 + eps).mean(),
}


def loss(out, batch, loss_config) -> torch.Tensor:
  """The weighted loss of ``loss_config`` (an hded-jax ``config.loss``); NCHW images."""
  weights = {k: float(loss_config[k]) for k in loss_config if k != 'charbonnier_eps'}
  if missing := sorted(k for k, w in weights.items() if w and k not in LOSS_TERMS):
    raise ValueError(f'The PyTorch reference has no {missing} loss; set those weights to 0 '
                     f'(e.g. --config.loss.{missing[0]}=0) to compare like for like.')
  return sum(w * LOSS_TERMS[k](out, batch, loss_config['charbonnier_eps'])
             for k, w in weights.items() if w)
