"""The built-in synthetic dataset (no download) with a small model: trains on a laptop CPU.

The README's first command runs this; it builds the dataset on first use.
"""

from configs import default
from hded_jax import models


def get_config():
  config = default.get_config()
  config.model = models.model_config('small')
  config.dataset.name = 'synthetic_defocus'
  config.dataset.builder_config = ''
  config.dataset.auto_prepare = True
  config.dataset.image_size = (64, 64)
  config.dataset.min_depth = 1e-3
  config.dataset.max_depth = 10.0
  config.dataset.num_threads = 2
  config.optimizer.learning_rate = 1e-3
  config.optimizer.decay_epochs = (10,)
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 14
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
