"""Devices this machine lacks, described well enough to compile for (a TPU slice by libtpu, GPUs
by JAX's CUDA plugin from XLA's description of the card in ``gpu_targets/``): compile time,
memory per device and what a GPU would autotune, before renting the machine. Nothing runs."""

from collections.abc import Sequence
import dataclasses
import importlib.util
import os
import re

import jax

from hded_jax import runtime

# High-bandwidth memory of one TPU chip, by a substring of its device_kind (Cloud TPU's chip
# specifications, in GB; most specific first): what a batch must fit where no chip reports its
# own.
TPU_HBM_BYTES = (
    ('TPU v5 lite', 16e9), ('TPU v5', 95e9), ('TPU v6 lite', 32e9), ('TPU v4', 32e9),
)

# XLA's descriptions of GPUs (GpuTargetConfigProto text), to compile for one that this machine
# lacks: `--compile_for=h100` reads gpu_targets/h100.pbtxt.
GPU_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gpu_targets')
# The share of a GPU's memory that JAX's allocator may use unless XLA_PYTHON_CLIENT_MEM_FRACTION
# says otherwise (JAX's GPU memory allocation docs), whether it preallocates or not.
JAX_GPU_MEMORY_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class DevicesNotHere:
  """Devices described without them (`devices_not_here`): programs compile for them on this
  machine, with their platform's XLA compiler, and cannot run."""
  target: str  # As named: 'v5e:2x2', 'h100', 'h100:8', a GpuTargetConfigProto file.
  devices: list[jax.Device]
  memory_bytes: int | None  # What a program may use on each device.


def devices_not_here(target: str) -> DevicesNotHere:
  """The devices that ``target`` names: a TPU slice as JAX names it ('v5e:2x2', 'v4:2x2x1',
  'v6e:4x4'...), described by libtpu; or GPUs, described by JAX's CUDA plugin: a card named in
  ``GPU_TARGETS_DIR`` ('h100', 'h200') or described in a GpuTargetConfigProto file ('.pbtxt'),
  one of it, or several after a colon: 'h100:8' (8 on one host), 'h100:2x8' (2 hosts of 8)."""
  gpus = _gpu_target(target)
  if gpus is not None or ':' not in target:
    return _gpus_not_here(target, gpus)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if importlib.util.find_spec('libtpu') is None:
    raise ValueError(f'Compiling for the TPU slice {target!r} needs libtpu, XLA\'s TPU '
                     "compiler: pip install -e '.[tpu]' (Linux on x86-64).")
  # No chips to guard: without this, a second process (pytest's workers) finds libtpu's
  # lockfile taken and cannot describe the slice.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    devices = list(topologies.get_topology_desc(topology_name=target, platform='tpu').devices)
  except Exception as error:  # pylint: disable=broad-except
    # libtpu's own error names neither the argument nor a valid form.
    raise ValueError(f'libtpu could not describe the TPU slice {target!r} ({error}); name '
                     "one as 'v5e:2x2', 'v4:2x2x1' or 'v6e:4x4' (version:chips per axis), or "
                     f"GPUs as one of {_known_gpus()} ('h100:8': 8 on one host).") from error
  hbm = next((int(hbm) for kind, hbm in TPU_HBM_BYTES if kind in devices[0].device_kind), None)
  return DevicesNotHere(target, devices, hbm)


def _known_gpus() -> list[str]:
  return sorted(name.removesuffix('.pbtxt') for name in os.listdir(GPU_TARGETS_DIR))


def _gpu_target(target: str) -> tuple[str, int, int] | None:
  """(the card's description file, hosts, GPUs per host) where ``target`` names GPUs, else
  None."""
  card, _, count = target.rpartition(':')
  counts = re.fullmatch(r'(?:(\d+)x)?(\d+)', count)
  if not card or not counts:
    card, counts = target, None
  if card.endswith('.pbtxt'):
    path = card
  elif card.lower() in _known_gpus():
    path = os.path.join(GPU_TARGETS_DIR, f'{card.lower()}.pbtxt')
  else:
    return None
  return path, *((int(counts.group(1) or 1), int(counts.group(2))) if counts else (1, 1))


def _gpus_not_here(target: str, gpus: tuple[str, int, int] | None) -> DevicesNotHere:
  """GPUs described by JAX's CUDA plugin from XLA's description of the card."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if gpus is None:
    raise ValueError(f'No GPU or TPU slice named {target!r}: name a TPU slice as \'v5e:2x2\' '
                     f'(version:chips per axis), a GPU as one of {_known_gpus()} or a file of '
                     'XLA\'s GpuTargetConfigProto (.pbtxt) describing the card, several as '
                     '\'h100:8\' (8 on one host) or \'h100:2x8\' (2 hosts of 8).')
  path, hosts, per_host = gpus
  if not os.path.isfile(path):
    raise ValueError(f'No file {path!r} describing a GPU (XLA\'s GpuTargetConfigProto), or name '
                     f'a GPU as one of {_known_gpus()}.')
  if min(hosts, per_host) < 1:
    raise ValueError(f'{target!r} names no GPU: give at least one host and one GPU on it.')
  if not runtime.cuda_plugins():
    raise ValueError(f'Compiling for the GPU {target!r} needs JAX\'s CUDA plugin: pip install '
                     "-e '.[test]' (Linux on x86-64), or pip install 'jax[cuda13-local]'.")
  with open(path) as f:
    text = f.read()
  try:
    devices = list(topologies.get_topology_desc(target, 'cuda', target_config=text,
                                                topology=f'1x{hosts}x{per_host}').devices)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(
        f'JAX\'s CUDA plugin could not describe the GPU {target!r} ({error}). Without a GPU '
        'the plugin starts only if JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 is set before JAX starts '
        '(python -m hded_jax.benchmark sets it there: runtime.skip_unused_cuda_check), and '
        'reads the file as XLA\'s GpuTargetConfigProto.') from error
  size = re.search(r'device_memory_size:\s*(\d+)', text)
  fraction = float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', JAX_GPU_MEMORY_FRACTION))
  return DevicesNotHere(target, devices, int(int(size.group(1)) * fraction) if size else None)


def compiler_options_for(devices: Sequence[jax.Device]) -> dict[str, object]:
  """Options for compiling without running: GPU autotuning off (it times candidates on the
  device: most of a cold GPU compile, docs/performance.md), and for a GPU the settings
  `runtime.tune_for_platform` gives a GPU process, also where this one computes elsewhere."""
  options = {'xla_gpu_autotune_level': 0}
  if devices[0].platform == 'gpu':
    options.update(runtime.gpu_compiler_options())
  return options
