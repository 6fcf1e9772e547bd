"""Shared fixtures: the tiny synthetic dataset (32x32, 8 train / 4 test) and a tiny config."""

import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import synthetic
from hded_jax import models
from hded_jax import runtime
import tfds_builders  # pylint: disable=unused-import  (registers the builders)

# As the entry points do (runtime.setup): before any test starts the backend.
runtime.use_eigen_convolutions()


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """Tests build the same tiny train step many times; compile it once per session."""
  runtime.enable_compilation_cache(str(tmp_path_factory.mktemp('jax_cache')))


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('synthetic_defocus/tiny', data_dir=data_dir,
               file_format='array_record').download_and_prepare()
  return data_dir


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The synthetic config shrunk to the tiny model and dataset: a step takes well under 1 s."""
  config = synthetic.get_config()
  config.model = models.model_config('tiny')
  config.dataset.builder_config = 'tiny'
  config.dataset.data_dir = data_dir
  config.dataset.auto_prepare = False
  config.dataset.image_size = (32, 32)
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_train_steps = 4
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.eval_timeout_secs = 5
  config.update(overrides)
  return config
