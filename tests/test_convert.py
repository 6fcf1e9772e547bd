"""PyTorch -> hded-jax conversion: exact parity with a PyTorch 2HDED:NET, ImageNet init, errors."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util

from hded_jax import checkpoints, models
from hded_jax.pytorch import weights
from tests.conftest import REPO
from tests.fixtures.models import random_model, zeros_model

torch = pytest.importorskip('torch')
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from hded_jax.pytorch import reference as torch_reference

ARCH_KEYS = ('block_sizes', 'growth_rate', 'num_init_features', 'bn_size')
TINY = {k: tuple(v) if k == 'block_sizes' else v
        for k, v in models.model_config('tiny').items() if k in ARCH_KEYS}


def randomize_(model, seed: int = 0):
  """Random weights and BatchNorm running stats that keep activations O(1) through the net."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for t, lo, hi in ((m.weight, 0.5, 1.5), (m.bias, -0.2, 0.2),
                          (m.running_mean, -0.2, 0.2), (m.running_var, 0.5, 2.0)):
          t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
      elif isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
        fan_in = m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else (
            m.weight.shape[0] * m.weight[0, 0].numel() / 4)  # Stride 2: 1/4 of taps are live.
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
  return model.eval()


def torch_model(heads=('depth', 'aif'), seed=0, **arch):
  return randomize_(torch_reference.HDEDNet(heads=heads, **arch), seed)


def numpy_state_dict(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def torch_forward(model, image_nhwc):
  with torch.no_grad():
    out = model(torch.from_numpy(image_nhwc.transpose(0, 3, 1, 2)))
  return {'depth': out['depth'].numpy(),
          **({'aif': out['aif'].numpy().transpose(0, 2, 3, 1)} if 'aif' in out else {})}


def random_image(h, w, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (1, h, w, 3)).astype(np.float32)


def test_densenet121_parity():
  """The full-size network, converted, computes the PyTorch function (one pass each)."""
  reference = torch_model()
  assert sum(p.numel() for p in reference.parameters()) == 41_414_400  # The paper's count.
  state_dict = numpy_state_dict(reference)
  config = weights.infer_model_config(state_dict)
  for key, value in models.model_config('densenet121').items():
    assert config[key] == value, key
  model = weights.convert_official(state_dict, config)
  image = random_image(256, 256)
  expected = torch_forward(reference, image)
  got = nnx.jit(lambda m, x: m(x))(model, image)
  for head in ('depth', 'aif'):
    assert np.abs(expected[head]).max() > 0.5  # Not trivially small.
    np.testing.assert_allclose(got[head], expected[head], atol=1e-4, rtol=0)


def test_official_file_to_checkpoint(tmp_path):
  """DataParallel keys inside `state_dictG` -> checkpoint dir that load_model reads."""
  reference = torch_model(**TINY)
  path = tmp_path / 'official.pth.tar'
  torch.save({'epoch': 3, 'state_dictG': {f'module.{k}': v
                                          for k, v in reference.state_dict().items()}}, path)
  weights.write_official(str(path), str(tmp_path / 'ckpt'), aif_tanh=True, depth_scale=2.0)
  model, config, step = checkpoints.load_model(str(tmp_path / 'ckpt'))
  assert step == 0 and tuple(config.model.heads) == ('depth', 'aif')
  assert {k: config.model[k] for k in ARCH_KEYS} == {**TINY, 'block_sizes': (1, 1, 1, 1)}
  image = random_image(64, 96)  # Non-square: catches H/W swaps.
  expected = torch_forward(reference, image)
  got = model(image)
  np.testing.assert_allclose(got['depth'], 2.0 * expected['depth'], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got['aif'], np.tanh(expected['aif']), atol=1e-5, rtol=0)
  with pytest.raises(FileExistsError, match='not empty'):
    weights.write_official(str(path), str(tmp_path / 'ckpt'))


def test_depth_only_checkpoint_and_heads_selection():
  single = torch_model(heads=('depth',), **TINY)
  config = weights.infer_model_config(numpy_state_dict(single))
  assert tuple(config.heads) == ('depth',)
  image = random_image(32, 64)
  got = weights.convert_official(numpy_state_dict(single), config)(image)
  assert set(got) == {'depth'}
  np.testing.assert_allclose(got['depth'], torch_forward(single, image)['depth'], atol=1e-5)

  both = torch_model(seed=1, **TINY)
  config = weights.infer_model_config(numpy_state_dict(both), heads=['depth'])
  got = weights.convert_official(numpy_state_dict(both), config)(image)
  np.testing.assert_allclose(got['depth'], torch_forward(both, image)['depth'], atol=1e-5)
  with pytest.raises(ValueError, match='holds only'):
    weights.infer_model_config(numpy_state_dict(single), heads=['depth', 'aif'])


def test_cli_official(tmp_path):
  reference = torch_model(**TINY)
  torch.save(reference.state_dict(), tmp_path / 'bare.pth')
  run = subprocess.run(
      [sys.executable, '-m', 'hded_jax.convert', 'official', str(tmp_path / 'bare.pth'),
       str(tmp_path / 'out'), '--heads=depth', '--depth_scale=0.5'],
      check=True, capture_output=True, cwd=REPO, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  # What it wrote in one line; the checkpoint library's own progress left out (readable_logs).
  assert re.search(r'Wrote \S+/out: heads depth, block sizes \(\d+, \d+, \d+, \d+\), growth rate '
                   r'\d+, aif_tanh=False, depth_scale=0.5; \d+ parameters\.\n', run.stderr), (
                       run.stderr)
  assert 'checkpoint_manager.py' not in run.stderr, run.stderr
  model, config, _ = checkpoints.load_model(str(tmp_path / 'out'))
  assert tuple(config.model.heads) == ('depth',) and config.model.depth_scale == 0.5
  image = random_image(32, 32)
  np.testing.assert_allclose(model(image)['depth'], 0.5 * torch_forward(reference, image)['depth'],
                             atol=1e-5)


@pytest.fixture
def tiny_state_dict():
  return numpy_state_dict(torch_model(**TINY))


def test_unknown_key(tiny_state_dict):
  tiny_state_dict['features.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'Unknown keys[^\n]*\n  features\.extra\.weight'):
    weights.convert_official(tiny_state_dict, weights.infer_model_config(tiny_state_dict))


def test_missing_key(tiny_state_dict):
  del tiny_state_dict['decoder_aif.d_aif_block3.0.bn2.running_var']
  with pytest.raises(ValueError, match=r'Missing keys \(1\):\n  decoder_aif\.d_aif_block3\.0\.bn2'
                     r'\.running_var \(-> aif_decoder\.blocks\.2\.bn2\.var\)'):
    weights.convert_official(tiny_state_dict, weights.infer_model_config(tiny_state_dict))


def test_wrong_shape(tiny_state_dict):
  config = weights.infer_model_config(tiny_state_dict)
  tiny_state_dict['decoder.d_block5.0.conv1.weight'] = np.zeros((17, 9, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r'decoder\.d_block5\.0\.conv1\.weight has shape '
                     r'\(17, 9, 3, 3\).*depth_decoder\.blocks\.0\.conv1\.kernel needs '
                     r'\(4, 4, 17, 9\)'):
    weights.convert_official(tiny_state_dict, config)


def test_pickled_objects_need_allow_pickle(tmp_path, tiny_state_dict):
  path = tmp_path / 'with_args.pth'
  torch.save({'args': {'lr': object.__new__(Opaque)},
              'state_dictG': {k: torch.from_numpy(v) for k, v in tiny_state_dict.items()}}, path)
  with pytest.raises(ValueError, match='--allow_pickle'):
    weights.read_torch_state_dict(str(path))
  assert weights.read_torch_state_dict(str(path), allow_pickle=True).keys() == {
      k for k in tiny_state_dict if not k.endswith('num_batches_tracked')}
  torch.save({'weights': 1}, tmp_path / 'odd.pth')
  with pytest.raises(ValueError, match='neither a state dict'):
    weights.read_torch_state_dict(str(tmp_path / 'odd.pth'))


@pytest.mark.parametrize('content', [b'hello', b'\x89PNG\r\n\x1a\n' + bytes(64)])
def test_a_file_that_is_no_checkpoint_is_named_so_with_or_without_allow_pickle(tmp_path,
                                                                                 content):
  """Not the advice to pass --allow_pickle, which reads such bytes no better."""
  path = tmp_path / 'photo.pth'
  path.write_bytes(content)
  for allow_pickle in (False, True):
    with pytest.raises(ValueError, match='is not a PyTorch checkpoint that torch.load can read') \
        as raised:
      weights.read_torch_state_dict(str(path), allow_pickle=allow_pickle)
    assert 'allow_pickle' not in str(raised.value)


def test_an_encoder_without_decoders_is_sent_to_the_imagenet_conversion(tiny_state_dict):
  encoder = {k: v for k, v in tiny_state_dict.items() if k.startswith('features.')}
  with pytest.raises(ValueError, match='no decoder .* `python -m hded_jax.convert imagenet`'):
    weights.infer_model_config(encoder)


class Opaque:
  pass


def torchvision_densenet121_state_dict(rng):
  """torchvision densenet121 names and shapes (growth 32, bn_size 4, blocks 6/12/24/16).

  Dense block 1 uses the legacy (torchvision < 0.4) names, e.g. `denselayer1.norm.1.weight`.
  """
  shapes = {'features.conv0.weight': (64, 3, 7, 7)}

  def bn(name, n):
    shapes.update({f'{name}.{p}': (n,) for p in ('weight', 'bias', 'running_mean',
                                                 'running_var')})
    shapes[f'{name}.num_batches_tracked'] = ()

  bn('features.norm0', 64)
  f = 64
  for b, n in enumerate((6, 12, 24, 16), 1):
    for j in range(n):
      layer = f'features.denseblock{b}.denselayer{j + 1}'
      sep = '.' if b == 1 else ''
      bn(f'{layer}.norm{sep}1', f + 32 * j)
      shapes[f'{layer}.conv{sep}1.weight'] = (128, f + 32 * j, 1, 1)
      bn(f'{layer}.norm{sep}2', 128)
      shapes[f'{layer}.conv{sep}2.weight'] = (32, 128, 3, 3)
    f += 32 * n
    if b < 4:
      bn(f'features.transition{b}.norm', f)
      shapes[f'features.transition{b}.conv.weight'] = (f // 2, f, 1, 1)
      f //= 2
  bn('features.norm5', f)
  shapes.update({'classifier.weight': (1000, 1024), 'classifier.bias': (1000,)})
  return {k: torch.from_numpy(rng.standard_normal(s).astype(np.float32)) if s else
          torch.tensor(7) for k, s in shapes.items()}


def test_imagenet(tmp_path):
  state_dict = torchvision_densenet121_state_dict(np.random.default_rng(0))
  torch.save(state_dict, tmp_path / 'densenet121.pth')
  out = tmp_path / 'imagenet'
  loaded = weights.convert_imagenet(
      weights.read_torch_state_dict(str(tmp_path / 'densenet121.pth')), str(out))
  manifest = json.loads((out / 'manifest.json').read_text())
  assert sorted(manifest['skipped']) == ['classifier.bias', 'classifier.weight',
                                         'features.conv0.weight']
  assert 'shape mismatch' in manifest['skipped']['features.conv0.weight']

  model = zeros_model(models.model_config('densenet121'))
  assert checkpoints.init_from(model, f'imagenet:{out}') == loaded
  flat = {checkpoints.path_name(p): np.asarray(v) for p, v in
          traverse_util.flatten_dict(nnx.state(model).to_pure_dict()).items()}
  encoder = sorted(n for n in flat if n.startswith('encoder.'))
  # Everything in the encoder but the replaced stem (conv0 7x7 -> 3x3, downconv0, norm1).
  assert sorted(loaded) == [n for n in encoder if not n.startswith(
      ('encoder.conv0.', 'encoder.downconv0.', 'encoder.norm1.'))]
  assert len(loaded) == 4 + sum(10 * n for n in (6, 12, 24, 16)) + 3 * 5 + 4
  for name in ('encoder.conv0.kernel', 'encoder.downconv0.kernel', 'encoder.norm1.scale',
               'depth_decoder.last_conv.kernel'):
    assert not flat[name].any(), name
  np.testing.assert_array_equal(flat['encoder.norm0.var'],
                                state_dict['features.norm0.running_var'])
  np.testing.assert_array_equal(flat['encoder.denseblocks.0.layers.2.norm2.scale'],
                                state_dict['features.denseblock1.denselayer3.norm.2.weight'])
  w = state_dict['features.denseblock3.denselayer7.conv2.weight'].numpy()
  np.testing.assert_array_equal(flat['encoder.denseblocks.2.layers.6.conv2.kernel'],
                                w.transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat['encoder.transitions.1.conv.kernel'][0, 0],
                                state_dict['features.transition2.conv.weight'][:, :, 0, 0].T)

  with pytest.raises(ValueError, match='DenseNet-121 encoder'):
    checkpoints.load_encoder_init(zeros_model(models.model_config('tiny')), str(out))


def test_init_from_checkpoint(tmp_path):
  source = random_model(models.model_config('tiny'), seed=1)
  checkpoints.save_model(str(tmp_path / 'ckpt'), 5, source,
                         ml_collections.ConfigDict({'model': models.model_config('tiny')}))
  model = random_model(models.model_config('tiny'), seed=2)
  loaded = checkpoints.init_from(model, f'checkpoint:{tmp_path / "ckpt"}')
  assert len(loaded) == len(jax.tree.leaves(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model).to_pure_dict(),
               nnx.state(source).to_pure_dict())

  depth_only = models.model_config('tiny')
  depth_only.heads = ('depth',)
  with pytest.raises(ValueError, match='different architecture'):
    checkpoints.init_from(zeros_model(depth_only), f'checkpoint:{tmp_path / "ckpt"}')


def test_init_from_spec_errors():
  model = zeros_model(models.model_config('tiny'))
  assert not checkpoints.init_from(model, '')
  with pytest.raises(ValueError, match='imagenet:DIR'):
    checkpoints.init_from(model, 'torchvision:/x')
  with pytest.raises(FileNotFoundError, match="init_from='imagenet:/nonexistent': /nonexistent "
                     'is not a folder'):
    checkpoints.init_from(model, 'imagenet:/nonexistent')


def test_legacy_and_data_parallel_names():
  keys = weights.canonical_keys({
      'module.features.denseblock2.denselayer10.norm.1.running_mean': 1,
      'features.denseblock1.denselayer1.conv.2.weight': 2,
      'features.norm0.num_batches_tracked': 3})
  assert keys == {'features.denseblock2.denselayer10.norm1.running_mean': 1,
                  'features.denseblock1.denselayer1.conv2.weight': 2}
