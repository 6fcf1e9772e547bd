"""A smoke run: the tiny model on the tiny synthetic dataset (32x32, 8 train / 4 test), 4 steps.

Tests build on it; on a new machine it checks the whole loop in a minute:
  python train.py --config=configs/smoke.py --workdir=/tmp/smoke
"""

from configs import synthetic
from hded_jax import models


def get_config():
  config = synthetic.get_config()
  config.model = models.model_config('tiny')
  config.dataset.builder_config = 'tiny'
  config.dataset.image_size = (32, 32)
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  return config
