"""predict.py / predict_lib: inputs, padding, batching, resizing, outputs and skipped files."""

import os
import re
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx, traverse_util
from PIL import Image

from hded_jax import checkpoints, models, predict_lib, visualize
from tests.conftest import REPO
from tests.fixtures.models import random_model


def save_checkpoint(directory, heads):
  config = models.model_config('tiny')
  config.heads = heads
  model = random_model(config)
  checkpoints.save_model(str(directory), 1, model, ml_collections.ConfigDict({'model': config}))
  return model


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  directory = tmp_path_factory.mktemp('ckpt')
  return directory, save_checkpoint(directory, ('depth', 'aif'))


@pytest.fixture(scope='module')
def forward(tiny):
  return predict_lib.make_forward(tiny[1])


_reference = nnx.jit(lambda model, x: model(x))


def direct(model, image_uint8, pad_to=None, mode='reflect'):
  """The model on one image, padded by hand to ``pad_to`` = (H, W) and cropped back."""
  h, w = image_uint8.shape[:2]
  x = image_uint8[None].astype(np.float32) / 127.5 - 1
  if pad_to:
    x = np.pad(x, ((0, 0), (0, pad_to[0] - h), (0, pad_to[1] - w), (0, 0)), mode=mode)
  out = {k: np.asarray(v)[0, :h, :w] for k, v in _reference(model, x).items()}
  out['aif'] = np.clip((out['aif'] + 1) / 2, 0, 1)
  return out


def write_image(path, h, w, seed=0):
  image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  Image.fromarray(image).save(path)
  return np.asarray(Image.open(path).convert('RGB'))  # JPEG is lossy: what the reader sees.


def load_outputs(directory, stem):
  return {'depth': np.load(directory / f'{stem}_depth.npy'),
          'aif': np.load(directory / f'{stem}_aif.npy')}


def test_cli_folder_with_odd_sizes_and_bad_files(tiny, tmp_path):
  directory, model = tiny
  inputs = tmp_path / 'in'
  inputs.mkdir()
  square = write_image(inputs / 'square.png', 64, 64)
  odd = write_image(inputs / 'odd.jpg', 37, 50, seed=1)
  (inputs / 'garbage.png').write_bytes(b'not a png at all')
  png = (inputs / 'square.png').read_bytes()
  (inputs / 'truncated.png').write_bytes(png[:len(png) // 2])  # Header fine, pixels cut.
  (inputs / 'notes.txt').write_text('hello')
  out = tmp_path / 'out'
  log = subprocess.run(
      [sys.executable, 'predict.py', f'--checkpoint={directory}', f'--input={inputs}',
       f'--output_dir={out}', '--batch_size=2'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu')).stderr
  assert sorted(os.listdir(out)) == sorted(
      f'{stem}_{head}.{ext}' for stem in ('square', 'odd') for head in ('depth', 'aif')
      for ext in ('npy', 'png'))
  for name in ('garbage.png', 'truncated.png', 'notes.txt'):
    assert re.search(f'Skipped .*{name}', log), name
  assert 'colour-mapped over' in log

  for stem, image in (('square', square), ('odd', odd)):
    h, w = image.shape[:2]
    got = load_outputs(out, stem)
    assert got['depth'].shape == (h, w) and got['depth'].dtype == np.float32
    assert got['aif'].shape == (h, w, 3) and got['aif'].dtype == np.float32
    assert 0 <= got['aif'].min() and got['aif'].max() <= 1
    expected = direct(model, image, pad_to=(64, 64))
    for head in ('depth', 'aif'):
      np.testing.assert_allclose(got[head], expected[head], atol=1e-5, rtol=0)
    depth_png = np.asarray(Image.open(out / f'{stem}_depth.png'))
    assert depth_png.shape == (h, w, 3) and depth_png.dtype == np.uint8
    np.testing.assert_array_equal(depth_png, visualize.colorize_depth(
        got['depth'], got['depth'].min(), got['depth'].max()))
    aif_png = np.asarray(Image.open(out / f'{stem}_aif.png'))
    assert aif_png.shape == (h, w, 3) and aif_png.dtype == np.uint8
    assert np.abs(aif_png / 255 - got['aif']).max() <= 0.5 / 255 + 1e-6


def test_padding_and_batching_match_direct_forward(tiny, forward, tmp_path):
  """3 images of 64x64 (no padding needed) in batches of 2, one 37x50 in its own group."""
  _, model = tiny
  images = {f'img{i}': write_image(tmp_path / f'img{i}.png', 64, 64, seed=i) for i in range(3)}
  images['odd'] = write_image(tmp_path / 'odd.png', 37, 50, seed=5)
  out = tmp_path / 'out'
  summary = predict_lib.predict_files(forward, sorted(str(p) for p in tmp_path.glob('*.png')),
                                      str(out), batch_size=2)
  assert len(summary.written) == 4 and not summary.skipped
  for stem, image in images.items():
    got = load_outputs(out, stem)
    expected = direct(model, image, pad_to=None if stem != 'odd' else (64, 64))
    for head in ('depth', 'aif'):
      np.testing.assert_allclose(got[head], expected[head], atol=1e-5, rtol=0)


def test_pad_mode_edge(tiny, forward, tmp_path):
  _, model = tiny
  image = write_image(tmp_path / 'odd.png', 37, 50)
  predict_lib.predict_files(forward, [str(tmp_path / 'odd.png')], str(tmp_path / 'out'),
                            batch_size=2, pad_mode='edge')
  got = load_outputs(tmp_path / 'out', 'odd')
  edge = direct(model, image, pad_to=(64, 64), mode='edge')
  reflect = direct(model, image, pad_to=(64, 64), mode='reflect')
  np.testing.assert_allclose(got['depth'], edge['depth'], atol=1e-5, rtol=0)
  assert np.abs(edge['depth'] - reflect['depth']).max() > 1e-3  # The mode matters.


def test_resize_returns_original_size(tiny, forward, tmp_path):
  _, model = tiny
  write_image(tmp_path / 'odd.png', 37, 50)
  predict_lib.predict_files(forward, [str(tmp_path / 'odd.png')], str(tmp_path / 'out'),
                            batch_size=2, resize=(32, 64))
  got = load_outputs(tmp_path / 'out', 'odd')
  assert got['depth'].shape == (37, 50) and got['aif'].shape == (37, 50, 3)
  small = direct(model, predict_lib.read_image(str(tmp_path / 'odd.png'), (32, 64)))
  np.testing.assert_allclose(got['depth'], predict_lib.resize_output(small['depth'], (37, 50)),
                             atol=1e-5, rtol=0)


def test_depth_only_model_and_glob(tmp_path):
  save_checkpoint(tmp_path / 'ckpt', ('depth',))
  for i in range(2):
    write_image(tmp_path / f'photo{i}.png', 32, 32, seed=i)
  write_image(tmp_path / 'other.png', 32, 32)
  summary = predict_lib.run(str(tmp_path / 'ckpt'), str(tmp_path / 'photo*.png'),
                            str(tmp_path / 'out'), batch_size=2, depth_range=(-1.0, 1.0))
  assert len(summary.written) == 2
  assert sorted(os.listdir(tmp_path / 'out')) == [
      f'photo{i}_depth.{ext}' for i in range(2) for ext in ('npy', 'png')]


def test_find_inputs(tmp_path):
  write_image(tmp_path / 'a.png', 8, 8)
  write_image(tmp_path / 'b.JPG', 8, 8)
  (tmp_path / 'c.txt').write_text('x')
  (tmp_path / 'sub').mkdir()
  assert predict_lib.find_inputs(str(tmp_path / 'a.png')) == ([str(tmp_path / 'a.png')], {})
  paths, skipped = predict_lib.find_inputs(str(tmp_path))
  assert paths == [str(tmp_path / 'a.png'), str(tmp_path / 'b.JPG')]
  assert list(skipped) == [str(tmp_path / 'c.txt')]
  assert predict_lib.find_inputs(str(tmp_path / '*.png'))[0] == [str(tmp_path / 'a.png')]
  with pytest.raises(FileNotFoundError, match='No image files'):
    predict_lib.find_inputs(str(tmp_path / '*.tif'))
  with pytest.raises(FileNotFoundError, match='only 1 other files'):
    predict_lib.find_inputs(str(tmp_path / '*.txt'))
  write_image(tmp_path / 'a.jpg', 8, 8)
  with pytest.raises(ValueError, match='same output files'):
    predict_lib.find_inputs(str(tmp_path))


def test_parse_resize_and_pad():
  assert predict_lib.parse_resize('') is None
  assert predict_lib.parse_resize('256X320') == (256, 320)
  for bad in ('256', 'ax3', '0x32'):
    with pytest.raises(ValueError, match='HEIGHTxWIDTH'):
      predict_lib.parse_resize(bad)
  padded = predict_lib.pad_to_multiple(np.ones((2, 37, 64, 3)), 'edge')
  assert padded.shape == (2, 64, 64, 3)
  with pytest.raises(ValueError, match='pad_mode'):
    predict_lib.pad_to_multiple(np.ones((1, 8, 8, 3)), 'zeros')

