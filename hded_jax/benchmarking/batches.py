"""Batches made up for the benchmark, with the training batch's keys, shapes and dtypes: random
images, and depths as layered as real frames for rendering."""

import jax
import ml_collections
import numpy as np

from hded_jax import defocus
from hded_jax import input_pipeline
from tfds_builders import synthetic_defocus


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A global training batch with the pipeline's keys, shapes and dtypes: random images, and
  an NYU-like room's depth (0.5-10 m), as layered as real frames for rendering, seen by the
  NYU camera (``config.dataset.camera`` where it sets values or ranges)."""
  rng = np.random.default_rng(seed)
  n, (h, w) = config.batch_size, tuple(config.dataset.image_size)
  depth = np.broadcast_to(synthetic_defocus.room_scene(h, w, seed)[1], (n, h, w))
  nyu = defocus.CAMERAS['nyu']
  camera = np.array([getattr(nyu, name) for name in defocus.CAMERA_FIELDS], np.float32)
  choice = input_pipeline.CameraChoice.from_config(config.dataset.get('camera'))
  cameras = np.stack([choice.sample(camera, rng) if choice else camera for _ in range(n)])
  batch = {'image': rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
           'aif': rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32),
           'depth': depth.copy(), 'depth_valid': np.ones((n, h, w), bool),
           'blur': np.stack([input_pipeline.blur_map(d, c) for d, c in zip(depth, cameras)]),
           'camera': cameras}
  if choice is not None:
    batch['render_depth'] = depth.copy()
  return batch


def random_batch_spec(config: ml_collections.ConfigDict, batch_sharding: jax.sharding.Sharding
                      ) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes and dtypes of `random_batch`'s batch, from one image's: a batch of thousands
  need not be made to be compiled for."""
  one = config.copy_and_resolve_references()
  one.batch_size = 1
  return {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype,
                                  sharding=batch_sharding)
          for k, v in random_batch(one).items()}
