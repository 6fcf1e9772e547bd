"""Compiled programs kept on disk under a key known before tracing, so that a restart loads its
train step instead of tracing and lowering it again.

JAX's compilation cache is keyed by the lowered program, so every start traces and lowers the
step before it can look there, the longest part of a restart for the full model.
The key here is a digest of everything the program is made from: this package's source, the
files of the libraries that make programs (`_PROGRAM_LIBRARIES`: JAX, its plugins, Flax,
Optax, NumPy...), JAX's settings, the environment variables JAX and XLA read, Python, the
host's CPU, the devices, the program's arguments (shapes, dtypes, shardings) and the caller's
settings (the config). Nothing is cached over several processes. A library outside that list
is assumed not to change the program.

A loaded file runs as code (pickle, then XLA's executable): keep the cache directory as
private as the workdir.
"""

import dataclasses
import functools
import hashlib
import importlib.util
import os
import pathlib
import pickle
import platform
import sys
import threading

from absl import logging
import jax
from jax.experimental import serialize_executable

from hded_jax import files

# The newest programs kept; older ones are deleted when a new one is written.
MAX_PROGRAMS = 8
_SUFFIX = '.program'
# Environment variables that JAX, XLA and their plugins read when they trace or compile.
_ENV_PREFIXES = ('JAX_', 'XLA_', 'LIBTPU', 'CUDA_', 'NVIDIA_', 'NCCL_', 'TF_XLA')
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# The libraries whose code makes the traced and compiled programs, JAX's plugins and pip's CUDA
# libraries included. Every file where each one is imported from is part of the key, by path,
# size and modification time: installed from a wheel, editable or a checkout on PYTHONPATH,
# and edited in place or not.
_PROGRAM_LIBRARIES = ('jax', 'jaxlib', 'jax_plugins', 'jax_cuda12_plugin', 'jax_cuda12_pjrt',
                      'jax_cuda13_plugin', 'jax_cuda13_pjrt', 'libtpu', 'nvidia', 'flax',
                      'optax', 'chex', 'numpy', 'ml_dtypes', 'opt_einsum')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


@functools.cache
def _code() -> str:
  """A digest of this package's sources and of `_PROGRAM_LIBRARIES`' files."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE_DIR.rglob('*.py')):
    digest.update(str(path.relative_to(_PACKAGE_DIR)).encode() + b'\0' + path.read_bytes())
  for name in _PROGRAM_LIBRARIES:
    spec = importlib.util.find_spec(name)
    if spec is None:
      continue
    for location in spec.submodule_search_locations or [spec.origin]:
      for root, dirs, names in os.walk(location):
        dirs[:] = sorted(d for d in dirs if d != '__pycache__')
        for file in sorted(names):
          stat = os.stat(os.path.join(root, file))
          digest.update(f'{root}/{file} {stat.st_size} {stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _host_cpu() -> str:
  """The CPU's features: XLA compiles CPU programs for the host's instruction set."""
  try:
    with open('/proc/cpuinfo') as f:
      return next((line for line in f if line.startswith(('flags', 'Features'))), '')
  except OSError:
    return platform.processor()


def _spec(x) -> str:
  return f'{x.shape} {x.dtype} {getattr(x, "sharding", None)}'


def _key(name: str, args, settings) -> str:
  devices = jax.devices()
  parts = {
      'name': name, 'code': _code(), 'python': sys.version, 'cpu': _host_cpu(),
      'jax_config': sorted((k, repr(v)) for k, v in jax.config.values.items()),
      'environment': sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)),
      'devices': [devices[0].client.platform_version] + [
          (d.platform, d.device_kind, d.id, d.process_index) for d in devices],
      'arguments': [str(jax.tree.structure(args))] + [_spec(x) for x in jax.tree.leaves(args)],
      'settings': repr(settings),
  }
  return hashlib.sha256(repr(parts).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class CachedProgram:
  """Where a program for ``args`` is (or will be) kept, and the argument structure its
  callers pass."""
  path: str
  args: object

  def exists(self) -> bool:
    return os.path.exists(self.path)

  def load(self) -> jax.stages.Compiled | None:
    """The program, or None where it cannot be loaded (then the file is removed and the
    caller compiles it: nothing is lost but time)."""
    try:
      with open(self.path, 'rb') as f:
        payload, in_tree, out_tree = pickle.load(f)
      if in_tree != jax.tree.structure((self.args, {})):
        raise ValueError(f'its arguments are {in_tree}')
      compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception as error:  # Whatever a damaged or foreign file raises: compile instead.
      logging.warning('Compiling the program again: %s could not be loaded (%s: %s).',
                      self.path, type(error).__name__, error)
      self.remove()
      return None
    os.utime(self.path)  # The newest-used programs are the ones kept.
    return compiled

  def remove(self) -> None:
    pathlib.Path(self.path).unlink(missing_ok=True)

  def save(self, compiled: jax.stages.Compiled) -> None:
    """Writes ``compiled`` whole or not at all (a temporary file renamed into place), then
    deletes all but the newest `MAX_PROGRAMS`. A program XLA cannot serialise is logged and
    skipped."""
    try:
      blob = pickle.dumps(serialize_executable.serialize(compiled))
    except (ValueError, NotImplementedError, TypeError, pickle.PicklingError) as error:
      logging.warning('The compiled program is not cached (%s: %s).', type(error).__name__,
                      error)
      return
    directory = os.path.dirname(self.path)
    try:
      with files.atomic_write(self.path, 'wb') as f:
        f.write(blob)
    except OSError as error:  # A full disk, a read-only cache: training goes on without it.
      logging.warning('The compiled program is not cached: %s (%s).', self.path, error)
      return
    programs = []
    for path in pathlib.Path(directory).glob(f'*{_SUFFIX}'):
      try:  # Another process sharing the cache may delete one meanwhile.
        programs.append((path.stat().st_mtime, path))
      except FileNotFoundError:
        pass
    for _, old in sorted(programs, reverse=True)[MAX_PROGRAMS:]:
      old.unlink(missing_ok=True)


def compile_and_keep(lowered: jax.stages.Lowered,
                     cached: CachedProgram | None) -> jax.stages.Compiled:
  """``lowered`` compiled, and kept in ``cached`` where XLA compiled it rather than JAX reading
  it from its compilation cache: such an executable does not serialise whole on XLA's CPU
  backend (jaxlib 0.10.2: its loaded copy stops at the first step, 'Function
  add_select_fusion.1 not found'). A restart then traces the step and reads it from JAX's
  cache as before."""
  thread = threading.get_ident()
  hits = []

  def note_cache_hit(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT and threading.get_ident() == thread:
      hits.append(event)

  jax.monitoring.register_event_listener(note_cache_hit)
  try:
    compiled = lowered.compile()
  finally:
    jax.monitoring.unregister_event_listener(note_cache_hit)
  if cached and not hits:
    cached.save(compiled)
  return compiled


def cached_program(name: str, args, **settings) -> CachedProgram | None:
  """Where the program ``name`` compiled for ``args`` (arrays or ShapeDtypeStructs, with their
  shardings) and ``settings`` (everything else it is built from that the code does not fix,
  e.g. the config) is kept: ``programs/`` in JAX's compilation cache directory. None where
  nothing is cached: no compilation cache set, or several processes."""
  cache_dir = jax.config.values.get('jax_compilation_cache_dir')
  if not cache_dir or jax.process_count() > 1:
    return None
  key = _key(name, args, settings)
  return CachedProgram(os.path.join(cache_dir, 'programs', f'{name}-{key[:32]}{_SUFFIX}'),
                       args)
