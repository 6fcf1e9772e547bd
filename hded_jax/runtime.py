"""Process set-up shared by the entry points: multi-host init and the compilation cache."""

import os

from absl import logging
import jax
import tensorflow as tf


def setup(workdir: str, *, distributed: bool = True) -> None:
  # TFDS uses TensorFlow for I/O only; keep it off the accelerators.
  for kind in ('GPU', 'TPU'):
    tf.config.set_visible_devices([], kind)
  if distributed and _is_multihost_env():
    # Cluster environments (TPU, SLURM) are detected by JAX; elsewhere these variables say it.
    env = {k: int(os.environ[v]) for k, v in (('num_processes', 'JAX_NUM_PROCESSES'),
                                              ('process_id', 'JAX_PROCESS_ID'))
           if v in os.environ}
    jax.distributed.initialize(**env)
  cache_dir = os.environ.get('HDED_JAX_CACHE_DIR') or os.path.join(
      os.path.abspath(workdir), 'jax_cache')
  # Restarts (resume after preemption, eval beside train) reuse compiled programs.
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  logging.info('JAX process %d/%d, %d local / %d global devices (%s); compilation cache %s.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, cache_dir)


def _is_multihost_env() -> bool:
  """True on TPU pods, SLURM/GPU clusters or when JAX_COORDINATOR_ADDRESS is set."""
  return any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS',
                                        'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS'))
