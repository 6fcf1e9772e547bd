"""Input pipeline: scaling, paired augmentation, shuffling/resume, eval padding, errors."""

import json

import numpy as np
import pytest

from hded_jax import input_pipeline
from tests.conftest import tiny_config


def fake_source(n=10, h=8, w=12):
  rng = np.random.default_rng(0)
  return [{'image': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
           'aif': rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
           'depth': np.where(rng.random((h, w)) < 0.2, 0, rng.uniform(0.5, 2, (h, w)))
                    .astype(np.float32),
           'index': i} for i in range(n)]


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
  config = tiny_config('unused', batch_size=4)
  config.dataset.image_size = (8, 12)
  source = fake_source(10)
  it = input_pipeline.train_iterator(config, source)
  first = [next(it) for _ in range(3)]
  assert first[0]['image'].shape == (4, 8, 12, 3) and first[0]['depth'].shape == (4, 8, 12)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (10 examples)
  resumed = input_pipeline.train_iterator(config, source)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  seen = np.concatenate([b['image'] for b in first[:2]])  # 8 examples of epoch 1: distinct
  assert len({x.tobytes() for x in seen}) == 8


def test_eval_batches_cover_the_split_once_with_padding_masked():
  config = tiny_config('unused', eval_batch_size=4)
  config.dataset.image_size = (8, 12)
  batches = list(input_pipeline.eval_batches(config, fake_source(10)))
  assert len(batches) == 3
  masks = np.concatenate([b['example_mask'] for b in batches])
  assert masks.tolist() == [True] * 10 + [False] * 2
  np.testing.assert_array_equal(batches[0]['image'][0],
                                fake_source(10)[0]['image'] / np.float32(127.5) - 1)
  assert len(list(input_pipeline.eval_batches(config, fake_source(10), num_examples=3))) == 1


def test_too_small_split_and_unprepared_dataset_errors(tmp_path):
  config = tiny_config(str(tmp_path), batch_size=16)
  with pytest.raises(ValueError, match='fewer than batch_size=16'):
    input_pipeline.train_iterator(config, fake_source(10))
  config.dataset.name = 'nyu_depth_v2_defocus'
  config.dataset.builder_config = 'focus_2m'
  with pytest.raises(FileNotFoundError, match='python -m tfds_builders.prepare '
                                              'nyu_depth_v2_defocus'):
    input_pipeline.data_source(config, 'train')
