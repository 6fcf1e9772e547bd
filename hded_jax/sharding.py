"""The device mesh and how arrays are laid out on it, shared by training, evaluation and the
benchmark.

The batch is split over the mesh's 'data' axis and everything else is replicated, so the same
code runs on one CPU, several GPUs, a TPU slice or several hosts; XLA inserts the cross-device
reductions (BatchNorm statistics are over the global batch).
"""

from collections.abc import Mapping
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

P = jax.sharding.PartitionSpec


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over ``devices``: default all devices of all processes; those of
  a TPU slice or GPU that this machine lacks, to compile for them ahead of time
  (`compile_targets.devices_not_here`)."""
  num_devices = len(devices) if devices is not None else jax.device_count()
  model = mesh_config.model
  if model < 1 or num_devices % model:
    raise ValueError(f'config.mesh.model={model} does not divide the {num_devices} devices: '
                     f'set it to a divisor of {num_devices}, e.g. --config.mesh.model=1.')
  data = mesh_config.data if mesh_config.data > 0 else num_devices // model
  if data * model != num_devices:
    raise ValueError(f'mesh data={mesh_config.data} x model={model} does not cover the '
                     f'{num_devices} devices; set config.mesh.data=-1 to use them all.')
  return jax.make_mesh((data, model), ('data', 'model'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def check_batch_splits(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  """Stops where the training batch does not split evenly over the mesh's data axis, naming a
  size that does (JAX's own error, from inside the first step, names shardings and tiling
  factors)."""
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(
        f'config.batch_size={batch_size} does not split evenly over the {data} devices of the '
        f"mesh's data axis (config.mesh): make the batch a multiple of {data}, e.g. "
        f'{max(1, round(batch_size / data)) * data}.')


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P('data'))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray],
                 sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Per-process arrays -> global arrays split along the batch axis over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def abstract(tree, sharding: jax.sharding.Sharding | None = None):
  """ShapeDtypeStructs of ``tree``'s arrays, placed with ``sharding`` (default: each array's own,
  else the first local device): what Orbax restores into."""
  default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding or getattr(x, 'sharding', None) or default),
      tree)
