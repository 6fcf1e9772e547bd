"""The authors' training settings (docs/training.md); dataset configs start from here."""

import ml_collections

from hded_jax import defocus
from hded_jax import losses
from hded_jax import models


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 123
  config.model = models.model_config('densenet121')
  # '' (random init), 'imagenet:DIR' (from `python -m hded_jax.convert imagenet`) or
  # 'checkpoint:DIR' (any hded-jax checkpoint directory).
  config.init_from = ''

  config.dataset = ml_collections.ConfigDict(dict(
      name='nyu_depth_v2_defocus',
      builder_config='',  # '' = the builder's default (e.g. focus_2m).
      data_dir=ml_collections.FieldReference(None, field_type=str),
      auto_prepare=False,  # Only the synthetic dataset can build itself.
      train_split='train',
      eval_split='test',
      image_size=(256, 256),  # Resized, aspect not kept, as the authors did.
      hflip=True,
      color_jitter=0.0,
      num_threads=0,  # Preprocessing threads; 0 = one per host core, at most 16.
      prefetch=8,  # Batches prepared ahead (at least one per thread).
      num_workers=0,  # >0: grain worker processes for preprocessing.
      # Examples kept in memory after their first read, decoded and resized, where this
      # process's share of a split fits in this many GB (each worker process keeps its own);
      # 0: read and resize every example every epoch.
      keep_resized_gb=4.0,
      # Evaluation: depth range of valid ground truth, and where depth is scored (a name from
      # hded_jax.metrics.EVAL_PROTOCOLS, written beside every metric).
      min_depth=1e-3,
      max_depth=10.0,
      eval_protocol='authors',
      # Render the defocused input during training from the stored AiF image and depth, with
      # this camera instead of the stored renderings: per field None (each example's own), a
      # value, or a (low, high) range drawn per training example; evaluation takes each
      # range's middle. Metres (the f-number is a ratio); the pixel size at the stored image
      # resolution. All None: the stored images. E.g.
      # --config.dataset.camera.focus_distance=1.5,3.0
      camera=ml_collections.ConfigDict({
          name: ml_collections.FieldReference(None, field_type=object)
          for name in defocus.CAMERA_FIELDS}),
  ))

  config.loss = losses.default_loss_config()

  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-4,
      b1=0.5,
      b2=0.999,
      weight_decay=0.0,
      # Learning rate x decay_factor after each of these epochs.
      decay_epochs=(200,),
      decay_factor=0.1,
      grad_clip_norm=0.0,  # 0 = no clipping.
      # Adam over one vector of all the parameters (optax.flatten) instead of each parameter
      # apart: the same updates from far fewer ops and GPU kernels (docs/performance.md), not
      # yet timed on a GPU (benchmarks/gpu.sh flat_b32); on the CPU no faster. The optimizer
      # state's layout follows it: a run resumes only with the setting it started with.
      flatten=False,
  ))

  config.batch_size = 4  # Global, over all devices and processes.
  config.eval_batch_size = 8
  # Training length: num_train_steps if > 0, else num_epochs over the training split (training
  # saves the resolved step count with its checkpoints). The authors give only the decay point
  # (epoch 200); 300 epochs leaves 100 at the low rate.
  config.num_epochs = 300
  config.num_train_steps = -1

  config.log_every_steps = 100
  # Steps of a profiler trace (TensorBoard's profile tab, WORKDIR/plugins/profile; tens of MB
  # each) taken from step 10 and then hourly; 0 = no profiling.
  config.profile_steps = 0
  config.checkpoint_every_steps = 2000
  config.max_checkpoints_to_keep = 3
  # Images written to TensorBoard by eval.py (0 = none), and the number of test examples it
  # evaluates (-1 = the whole split).
  config.eval_num_images = 4
  config.eval_num_examples = -1

  # Mesh: 'data' x 'model' axes; data=-1 takes all devices the model axis leaves.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  return config
