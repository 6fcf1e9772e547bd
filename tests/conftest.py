"""Shared fixtures: the tiny synthetic dataset (32x32, 8 train / 4 test), the smoke config and
a finished tiny run."""

from collections.abc import Iterator
import os
import shutil

import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import smoke
from hded_jax import pytorch
from hded_jax import runtime
from hded_jax import train_lib
import tfds_builders  # pylint: disable=unused-import  (registers the builders)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Before the tests import TensorFlow (the tiny dataset's build, event files): see there.
pytorch.load_triton_first()

# As the entry points do (runtime.setup): before any test starts the backend.
runtime.use_eigen_convolutions()
# As the entry points do (runtime.tune_for_platform): off a GPU, JAX's CUDA plugin (the test
# extra) starts without CUDA's libraries, so that tests compile for a GPU
# (`compile_targets.devices_not_here`), and child processes inherit it.
runtime.skip_unused_cuda_check()
# Tests check what the programs compute, not how fast: XLA's CPU backend emits their machine
# code without LLVM's optimisations (the same HLO; the tiny train step compiles in 5-7 s instead
# of 12 and steps in 17 ms instead of 8), which cuts the suite by a third (2 cores: 13:56 ->
# 9:21). Speed is the benchmark's (docs/performance.md), which keeps XLA's default, as do
# train.py, eval.py and predict.py. Unless XLA_FLAGS already sets a level.
runtime.add_xla_flag('--xla_backend_optimization_level=0')


def forced_devices_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a child process on ``devices`` forced CPU devices: this process's flags
  less any device count of their own."""
  flag = '--xla_force_host_platform_device_count'
  inherited = [f for f in os.environ.get('XLA_FLAGS', '').split() if not f.startswith(flag)]
  return ' '.join([*inherited, f'{flag}={devices}'])


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory) -> str:
  """Tests build the same tiny train step many times; compile it once per session (programs
  started by tests can share it through HDED_JAX_CACHE_DIR)."""
  cache_dir = str(tmp_path_factory.mktemp('jax_cache'))
  runtime.enable_compilation_cache(cache_dir)
  return cache_dir


@pytest.fixture
def own_program_cache(tmp_path, compilation_cache) -> Iterator[str]:
  """The directory of a program cache (`hded_jax.program_cache`) that only this test uses, in a
  compilation cache of its own: the programs that earlier tests kept would be loaded instead of
  compiled (on jax 0.12 read from JAX's cache, and the program cache keeps no program read
  from there)."""
  runtime.enable_compilation_cache(str(tmp_path / 'jax_cache'))
  yield str(tmp_path / 'jax_cache' / 'programs')
  runtime.enable_compilation_cache(compilation_cache)


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('synthetic_defocus/tiny', data_dir=data_dir,
               file_format='array_record').download_and_prepare()
  return data_dir


def tiny_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """configs/smoke.py reading the tiny dataset from ``data_dir``: a step takes well under 1 s."""
  config = smoke.get_config()
  config.dataset.data_dir = data_dir
  config.dataset.auto_prepare = False
  config.update(overrides)
  return config


@pytest.fixture(scope='session')
def tiny_run(tiny_data_dir, tmp_path_factory) -> str:
  """WORKDIR of a finished 4-step tiny run (checkpoints 2 and 4). Tests copy it (``copy_run``)
  before changing anything."""
  workdir = str(tmp_path_factory.mktemp('tiny_run') / 'run')
  train_lib.train(tiny_config(tiny_data_dir), workdir)
  return workdir


def copy_run(workdir: str, to: str) -> str:
  shutil.copytree(workdir, to)
  return to
