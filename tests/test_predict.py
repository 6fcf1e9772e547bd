"""predict.py / predict_lib: inputs, padding, batching, resizing, outputs and skipped files."""

import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import ExifTags
from PIL import Image

from hded_jax import checkpoints, images, models, predict_lib, visualize
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
      [sys.executable, '-X', 'importtime', 'predict.py', f'--checkpoint={directory}',
       f'--input={inputs}', f'--output_dir={out}', '--batch_size=2'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu')).stderr
  # Predicting needs no TensorFlow (2-3 s to import): nothing on its way imports it.
  assert re.search(r'^import time:.*\| +jax$', log, re.M)
  assert not re.search(r'^import time:.*\| +tensorflow$', log, re.M)
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
        got['depth'], *predict_lib.depth_limits(got['depth'], None)))
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
  small = direct(model, images.read_rgb(str(tmp_path / 'odd.png'), (32, 64)))
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



def test_batches_hold_only_the_images_there_are_bucketed_by_padded_size(tiny, forward, tmp_path):
  """No padding images: 1 image at --batch_size=8 runs as a batch of 1. 64x64 and 37x50 both
  pad to 64x64 and share batches; 32x32 needs no padding and goes alone."""
  _, model = tiny
  for i in range(3):
    write_image(tmp_path / f'img{i}.png', 64, 64, seed=i)
  odd = write_image(tmp_path / 'odd.png', 37, 50, seed=5)
  write_image(tmp_path / 'small.png', 32, 32, seed=6)
  shapes = []

  def recording(batch):
    shapes.append(batch.shape)
    return forward(batch)

  paths = sorted(str(p) for p in tmp_path.glob('*.png'))
  predict_lib.predict_files(recording, paths, str(tmp_path / 'out'), batch_size=3)
  assert sorted(shapes) == [(1, 32, 32, 3), (1, 64, 64, 3), (3, 64, 64, 3)]
  shapes.clear()
  predict_lib.predict_files(recording, paths[:1], str(tmp_path / 'out'), batch_size=8)
  assert shapes == [(1, 64, 64, 3)]
  got = load_outputs(tmp_path / 'out', 'odd')
  np.testing.assert_allclose(got['depth'], direct(model, odd, pad_to=(64, 64))['depth'],
                             atol=1e-5, rtol=0)


def test_out_of_memory_names_the_flags_that_help(tmp_path):
  write_image(tmp_path / 'big.png', 40, 70)

  def exhausted(batch):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 73986457600 bytes.')

  with pytest.raises(MemoryError) as info:
    predict_lib.predict_files(exhausted, [str(tmp_path / 'big.png')], str(tmp_path / 'out'),
                              batch_size=4)
  message = str(info.value)
  assert '1 image(s) of 40x70 (padded to 64x96)' in message
  assert '--batch_size (now 4' in message and '--resize=HxW' in message
  assert 'Out of memory while trying to allocate' in message


def test_16_bit_and_float_images_are_scaled_and_others_refused(tmp_path):
  ramp = np.linspace(0, 1, 32 * 48).reshape(32, 48)
  expected = np.repeat(np.round(ramp * 255).astype(np.uint8)[..., None], 3, axis=-1)
  Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / 'gray16.png')
  assert Image.open(tmp_path / 'gray16.png').mode == 'I;16'
  Image.fromarray(ramp.astype(np.float32)).save(tmp_path / 'float.tif')
  for name in ('gray16.png', 'float.tif'):
    np.testing.assert_allclose(images.read_rgb(str(tmp_path / name)), expected, atol=1)
  Image.fromarray((ramp * 255).astype(np.float32)).save(tmp_path / 'float255.tif')
  with pytest.raises(ValueError, match=r'float image with values in \[0, 255\].*\[0, 1\]'):
    images.read_rgb(str(tmp_path / 'float255.tif'))
  Image.fromarray((ramp * 1000).astype(np.int32)).save(tmp_path / 'int32.tif')
  with pytest.raises(ValueError, match='32-bit integer'):
    images.read_rgb(str(tmp_path / 'int32.tif'))


def test_exif_orientation_is_applied(tiny, forward, tmp_path):
  """A phone photo stored 40 wide x 24 high with orientation 6 (turn 90 degrees clockwise to
  show) is shown 24 wide x 40 high: outputs come out that way."""
  _, model = tiny
  stored = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
  exif = Image.Exif()
  exif[ExifTags.Base.Orientation] = 6
  Image.fromarray(stored).save(tmp_path / 'phone.png', exif=exif)
  shown = np.rot90(stored, k=-1)
  assert images.image_size(str(tmp_path / 'phone.png')) == (40, 24)
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'phone.png')), shown)
  predict_lib.predict_files(forward, [str(tmp_path / 'phone.png')], str(tmp_path / 'out'))
  got = load_outputs(tmp_path / 'out', 'phone')
  assert got['depth'].shape == (40, 24)
  np.testing.assert_allclose(got['depth'], direct(model, shown, pad_to=(64, 32))['depth'],
                             atol=1e-5, rtol=0)


def test_predicting_into_the_input_folder_twice_reads_only_the_photos(tiny, tmp_path):
  directory, _ = tiny
  write_image(tmp_path / 'photo.jpg', 32, 32)
  for _ in range(2):
    report = predict_lib.run(str(directory), str(tmp_path), str(tmp_path))
    assert report.written == [str(tmp_path / 'photo.jpg')] and not report.skipped
  assert sorted(os.listdir(tmp_path)) == ['photo.jpg', 'photo_aif.npy', 'photo_aif.png',
                                          'photo_depth.npy', 'photo_depth.png']


def test_checkpoint_step_directory_and_bad_output_dir(tiny, tmp_path):
  directory, _ = tiny
  write_image(tmp_path / 'photo.png', 32, 32)
  report = predict_lib.run(str(directory / '1'), str(tmp_path / 'photo.png'),
                           str(tmp_path / 'out'))
  assert report.written == [str(tmp_path / 'photo.png')]
  (tmp_path / 'file').write_text('x')
  with pytest.raises(NotADirectoryError, match='--output_dir=.*file is a file'):
    predict_lib.run(str(directory), str(tmp_path / 'photo.png'), str(tmp_path / 'file'))


@pytest.mark.parametrize('args, message', [
    (['--camera=0.015,2.8,5.6um,2'], "--camera=0.015,2.8,5.6um,2: could not convert string to "
     "float: '5.6um'; give plain numbers (metres), e.g. 5.6e-6, not 5.6um."),
    (['--input=photos/a.png', 'b.png'], 'the shell expanded a glob into these files: quote it'),
])
def test_cli_usage_mistakes_are_named_before_the_model_loads(args, message, tmp_path):
  (tmp_path / 'b.png').write_bytes(b'')
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, 'predict.py'), '--checkpoint=/nonexistent',
       '--input=photos', f'--output_dir={tmp_path / "out"}', *args], cwd=tmp_path,
      capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run.returncode == 1 and message in run.stderr, run.stderr
  assert 'Traceback' not in run.stderr and not (tmp_path / 'out').exists()


def test_a_camera_for_a_model_that_does_not_read_it_is_said_to_change_nothing(caplog):
  with caplog.at_level('WARNING'):
    predict_lib.make_forward(random_model(models.model_config('tiny')), [0.015, 2.8, 5.6e-6, 2])
  assert 'The camera is not used' in caplog.text


def test_camera_aware_model_predicts_with_the_photos_camera(tmp_path):
  config = models.model_config('tiny')
  config.camera_input = True
  model = random_model(config)
  with pytest.raises(ValueError, match='--camera=FOCAL_LENGTH'):
    predict_lib.make_forward(model)
  with pytest.raises(ValueError, match='expected 4 values'):
    predict_lib.make_forward(model, [0.015, 2.8])
  photo = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  outputs = {}
  for focus in (1.5, 3.0):
    camera = [0.015, 2.8, 5.6e-6, focus]
    outputs[focus] = predict_lib.make_forward(model, camera)(photo)
    expected = nnx.jit(lambda m, x, c: m(x, camera=c))(model, photo, np.array([camera]))
    np.testing.assert_allclose(outputs[focus]['depth'], expected['depth'], rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs[1.5]['depth'], outputs[3.0]['depth'])
