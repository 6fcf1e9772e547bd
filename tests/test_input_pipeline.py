"""Input pipeline: scaling, paired augmentation, shuffling/resume, eval padding, errors,
cameras, blur maps and rendering the inputs with another camera."""

import json
import os
import threading
import time

import jax
import numpy as np
import pytest

from hded_jax import defocus
from hded_jax import images
from hded_jax import input_pipeline
from tests.conftest import tiny_config

NYU = defocus.CAMERAS['nyu']


def fake_source(n=10, h=8, w=12):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
           'aif': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
           'depth': np.where(rng.random((h, w)) < 0.2, 0, rng.uniform(0.5, 2, (h, w)))
                    .astype(np.float32),
           'camera': {k: np.float32(v) for k, v in NYU.as_dict().items()},
           'index': i} for i in range(n)]


def eval_source(config, source=None):
  """``source`` (default: the config's test split) as evaluation reads it."""
  return input_pipeline.eval_source(
      config, input_pipeline.data_source(config, 'test') if source is None else source)


def test_scaling_and_nearest_depth_resize():
  example = fake_source(1)[0]
  out = input_pipeline.Preprocess((8, 12))(example)
  np.testing.assert_allclose(out['image'], example['image'] / 127.5 - 1, atol=1e-6)
  assert out['image'].min() >= -1 and out['image'].max() <= 1
  np.testing.assert_array_equal(out['depth_valid'], example['depth'] > 0)
  resized = input_pipeline.Preprocess((16, 24))(example)
  # Nearest neighbour: every resized depth is one of the source depths (0 never blends in).
  assert set(np.unique(resized['depth'])) <= set(np.unique(example['depth']))


def test_flip_and_colour_jitter_apply_identically_to_all_targets():
  example = fake_source(1)[0]
  example['aif'] = example['image'].copy()
  plain = input_pipeline.Preprocess((8, 12))(example)
  augment = input_pipeline.Preprocess((8, 12), hflip=True, color_jitter=0.3)
  flipped = 0
  for seed in range(20):
    out = augment(example, np.random.default_rng(seed))
    np.testing.assert_array_equal(out['image'], out['aif'])  # same colour change on both
    is_flipped = np.array_equal(out['depth'], plain['depth'][:, ::-1])
    assert is_flipped or np.array_equal(out['depth'], plain['depth'])
    flipped += is_flipped
  assert 0 < flipped < 20


def test_train_iterator_shuffles_batches_and_resumes_from_its_state():
  """Also with another number of preprocessing threads (a run resumed on another host)."""
  config = tiny_config('unused', batch_size=4)
  config.dataset.image_size = (8, 12)
  config.dataset.num_threads = 0
  assert input_pipeline.preprocessing_threads(config) == min(  # one per host core
      os.cpu_count(), input_pipeline.MAX_AUTO_THREADS)
  source = fake_source(10)
  it = input_pipeline.train_iterator(config, source)
  first = [next(it) for _ in range(3)]
  assert first[0]['image'].shape == (4, 8, 12, 3) and first[0]['depth'].shape == (4, 8, 12)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (10 examples)
  config.dataset.num_threads = os.cpu_count() + 1
  resumed = input_pipeline.train_iterator(config, source)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  seen = np.concatenate([b['image'] for b in first[:2]])  # 8 examples of epoch 1: distinct
  assert len({x.tobytes() for x in seen}) == 8


class CountingSource:
  """A source that counts how often each example is read."""

  def __init__(self, examples):
    self.examples, self.reads = examples, [0] * len(examples)

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, index):
    self.reads[index] += 1
    return self.examples[index]


def test_resized_examples_are_kept_in_memory_where_the_split_fits_and_batches_stay_the_same():
  config = tiny_config('unused', batch_size=4)
  config.dataset.image_size = (16, 24)  # Resized: nothing is the source's own array.
  config.dataset.num_threads = 2
  batches = {}
  for keep_gb in (0.0, 1.0):
    config.dataset.keep_resized_gb = keep_gb
    source = CountingSource(fake_source(10))
    it = input_pipeline.train_iterator(config, source)
    batches[keep_gb] = [next(it) for _ in range(8)]  # Three epochs and more.
    it.close()
    if keep_gb:
      assert source.reads == [1] * 10
    else:
      assert min(source.reads) >= 3
  for a, b in zip(*batches.values(), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])

  # A split that does not fit is read afresh; what is kept is read-only, the source untouched.
  prepare = input_pipeline.Preprocess((8, 12))
  one = sum(v.nbytes for v in prepare.resized(fake_source(1)[0]).values())
  source = CountingSource(fake_source(10))
  assert not input_pipeline.ResizedSource(source, prepare, 10 * one - 1).keeps_examples
  kept = input_pipeline.ResizedSource(source, prepare, 10 * one)
  assert kept.keeps_examples and kept.nbytes == 10 * one
  assert kept[3] is kept[3] and not kept[3]['depth'].flags.writeable
  # At the stored size the kept depth is a view of the source's array: only the view is
  # read-only.
  assert source.examples[0]['depth'].flags.writeable
  expected = prepare(source.examples[3])
  for k, v in prepare.augmented(kept[3]).items():
    np.testing.assert_array_equal(v, expected[k])


def test_every_preprocessing_thread_prepares_a_batch_with_a_small_prefetch(monkeypatch):
  """A thread prepares a whole batch and only the buffer's batches are prepared: the buffer
  holds at least one batch per thread."""
  config = tiny_config('unused', batch_size=1)
  config.dataset.image_size = (8, 12)
  config.dataset.num_threads, config.dataset.prefetch = 4, 1
  running, most = [0], [0]
  lock = threading.Lock()
  augmented = input_pipeline.Preprocess.augmented

  def slow_augmented(self, example, rng=None):
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
    time.sleep(0.2)
    with lock:
      running[0] -= 1
    return augmented(self, example, rng)

  monkeypatch.setattr(input_pipeline.Preprocess, 'augmented', slow_augmented)
  it = input_pipeline.train_iterator(config, fake_source(10))
  for _ in range(4):
    next(it)
  it.close()  # Its threads would go on preparing batches into the next tests.
  assert most[0] >= 4  # Without the larger buffer: 2.


def test_eval_batches_cover_the_split_once_with_padding_masked():
  config = tiny_config('unused', eval_batch_size=4)
  config.dataset.image_size = (8, 12)
  batches = list(input_pipeline.eval_batches(config, eval_source(config, fake_source(10))))
  assert len(batches) == 3
  masks = np.concatenate([b['example_mask'] for b in batches])
  assert masks.tolist() == [True] * 10 + [False] * 2
  np.testing.assert_array_equal(batches[0]['image'][0],
                                fake_source(10)[0]['image'] / np.float32(127.5) - 1)
  assert len(list(input_pipeline.eval_batches(config, eval_source(config, fake_source(10)),
                                              num_examples=3))) == 1


def test_eval_batches_are_prepared_by_threads_in_order(monkeypatch):
  config = tiny_config('unused', eval_batch_size=4)
  config.dataset.image_size = (8, 12)
  config.dataset.num_threads = 1
  one_thread = list(input_pipeline.eval_batches(config, eval_source(config, fake_source(10))))
  threads = set()
  augmented = input_pipeline.Preprocess.augmented

  def recorded(self, example, rng=None):
    threads.add(threading.current_thread().name)
    time.sleep(0.01)  # So that every thread gets work.
    return augmented(self, example, rng)

  monkeypatch.setattr(input_pipeline.Preprocess, 'augmented', recorded)
  config.dataset.num_threads = 3
  for a, b in zip(one_thread,
                  input_pipeline.eval_batches(config, eval_source(config, fake_source(10))),
                  strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Only the eval pool's threads count: another test's grain iterator may still be preparing a
  # batch in its own thread, through the patched method.
  eval_threads = {t for t in threads if t.startswith('eval_preprocess')}
  assert len(eval_threads) == 3 and threading.main_thread().name not in threads, threads


def test_too_small_split_and_unprepared_dataset_errors(tmp_path):
  config = tiny_config(str(tmp_path), batch_size=16)
  with pytest.raises(ValueError, match='fewer than batch_size=16'):
    input_pipeline.train_iterator(config, fake_source(10))
  config.dataset.name = 'nyu_depth_v2_defocus'
  config.dataset.builder_config = 'focus_2m'
  with pytest.raises(FileNotFoundError, match='python -m tfds_builders.prepare '
                                              'nyu_depth_v2_defocus'):
    input_pipeline.data_source(config, 'train')


def camera_choice(**fields):
  camera = tiny_config('unused').dataset.camera
  camera.update(fields)
  return input_pipeline.CameraChoice.from_config(camera)


def test_camera_choice_takes_values_and_ranges_and_names_bad_ones():
  assert camera_choice() is None  # No field set: the stored images.
  choice = camera_choice(focus_distance=(1.5, 3.0), f_number=4)
  own = input_pipeline.camera_array(fake_source(1)[0])
  assert choice.ranges == (None, (4.0, 4.0), None, (1.5, 3.0))
  np.testing.assert_allclose(choice.sample(own, None), [0.015, 4.0, 5.6e-6, 2.25])
  drawn = np.stack([choice.sample(own, np.random.default_rng(i)) for i in range(50)])
  np.testing.assert_array_equal(drawn[:, :3], np.broadcast_to([0.015, 4.0, 5.6e-6], (50, 3))
                                .astype(np.float32))
  assert 1.5 <= drawn[:, 3].min() < 1.7 and 2.8 < drawn[:, 3].max() <= 3.0
  np.testing.assert_array_equal(choice.sample(own, np.random.default_rng(7)),
                                choice.sample(own, np.random.default_rng(7)))
  for bad in ((3.0, 1.5), (0.0, 1.0), (1.0, 2.0, 3.0), -2.0):
    with pytest.raises(ValueError, match='config.dataset.camera.focus_distance'):
      camera_choice(focus_distance=bad)
  with pytest.raises(ValueError, match='unknown fields'):
    input_pipeline.CameraChoice.from_config({'focus': 2.0})
  with pytest.raises(ValueError, match='must exceed focal_length'):
    camera_choice(focus_distance=0.01).sample(own, None)


def test_blur_map_is_the_signed_sigma_of_the_examples_camera_masked_where_invalid():
  example = fake_source(1)[0]
  example['camera']['focus_distance'] = np.float32(1.2)
  out = input_pipeline.Preprocess((8, 12))(example)
  valid = example['depth'] > 0
  camera = defocus.Camera(**{k: float(v) for k, v in example['camera'].items()})
  np.testing.assert_allclose(out['blur'][valid], defocus.signed_blur_sigma_px(
      example['depth'][valid], camera), rtol=1e-6)
  assert (out['blur'][~valid] == 0).all() and (out['blur'] < 0).any() and (out['blur'] > 0).any()
  np.testing.assert_allclose(out['camera'], [0.015, 2.8, 5.6e-6, 1.2])


def test_with_a_camera_the_pipeline_leaves_the_input_to_the_step():
  example = fake_source(1)[0]
  choice = camera_choice(focus_distance=(1.0, 3.0))
  preprocess = input_pipeline.Preprocess((8, 12), hflip=True, camera=choice, fill_depth=9.0)
  out = preprocess(example, np.random.default_rng(0))
  assert 'image' not in out and 1.0 <= out['camera'][3] <= 3.0
  flipped = not np.array_equal(out['depth'], example['depth'])
  depth = example['depth'][:, ::-1] if flipped else example['depth']
  np.testing.assert_array_equal(out['render_depth'], np.where(depth > 0, depth, 9.0))
  valid = depth > 0
  np.testing.assert_allclose(out['blur'][valid], defocus.signed_blur_sigma_px(
      depth[valid], defocus.Camera(*map(float, out['camera']))), rtol=1e-5)
  # The step renders the input; without rng (evaluation) the camera is each range's middle.
  fixed = input_pipeline.Preprocess((8, 12), camera=choice, fill_depth=9.0)(example)
  assert fixed['camera'][3] == 2.0


def test_rendering_with_the_datasets_own_camera_gives_the_stored_images(tiny_data_dir):
  """The stored tiny images were rendered by the builder at 32x32 with the NYU camera focused
  at 2 m; the steps' rendering with that camera gives them back (up to their uint8 rounding)."""
  config = tiny_config(tiny_data_dir)
  stored = next(input_pipeline.eval_batches(config, eval_source(config)))
  config.dataset.camera.focus_distance = 2.0
  rendering = input_pipeline.rendering(config)
  assert rendering == input_pipeline.Rendering(mode='clean', sigma_tolerance=None,
                                               scale=(1.0, 1.0), dilation_radius=4)
  batch = next(input_pipeline.eval_batches(config, eval_source(config)))
  assert 'image' not in batch
  rendered = jax.jit(rendering)(batch)['image']
  difference = np.abs(images.to_unit_range(np.asarray(rendered)) -
                      images.to_unit_range(stored['image']))
  assert difference.mean() <= 0.3 / 255 and difference.max() <= 0.51 / 255
  # Another camera gives other images: focused at 0.6 m, the near objects sharpen.
  config.dataset.camera.focus_distance = 0.6
  refocused = jax.jit(rendering)({**batch, 'camera': next(input_pipeline.eval_batches(
      config, eval_source(config)))['camera']})['image']
  assert np.abs(np.asarray(refocused) - rendered).mean() > 5 / 255


def test_rendering_at_the_input_size_scales_the_cameras_pixels(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  config.dataset.image_size = (64, 32)  # From the stored 32x32.
  config.dataset.camera.f_number = (2.0, 4.0)
  rendering = input_pipeline.rendering(config)
  assert rendering.scale == (2.0, 1.0) and rendering.dilation_radius == 6
