"""Compiled programs kept on disk under a key known before tracing, so that a restart loads its
train step instead of tracing and lowering it again.

JAX's compilation cache is keyed by the lowered program, so every start traces and lowers the
step before it can look there (4-7 s of a restart for the full model, docs/performance.md).
The key here is a digest of everything the program is made from: this package's source, every
installed distribution (its name, version and RECORD, which lists each of its files' hashes),
JAX's settings, the environment variables JAX and XLA read, Python, the host's CPU, the
devices, the program's arguments (shapes, dtypes, shardings) and the caller's settings (the
config). Nothing is cached where that digest cannot cover the code: another distribution
installed editable (no RECORD of its files) or several processes. What it cannot see is a
file of an installed package edited in place: delete ``programs/`` in the compilation cache
directory after doing that.

A loaded file runs as code (pickle, then XLA's executable): keep the cache directory as
private as the workdir.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import pickle
import platform
import re
import sys
import tempfile

from absl import logging
import jax
from jax.experimental import serialize_executable

# The newest programs kept; older ones are deleted when a new one is written.
MAX_PROGRAMS = 8
_SUFFIX = '.program'
# Environment variables that JAX, XLA and their plugins read when they trace or compile.
_ENV_PREFIXES = ('JAX_', 'XLA_', 'LIBTPU', 'CUDA_', 'NVIDIA_', 'NCCL_', 'TF_XLA')
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_PACKAGE_DIST = 'hded-jax'


def _normalized(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


@functools.cache
def _installed_code() -> str | None:
  """A digest of this package's sources and of every installed distribution; None where
  another distribution is installed editable (its RECORD does not list its files)."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE_DIR.rglob('*.py')):
    digest.update(str(path.relative_to(_PACKAGE_DIR)).encode() + b'\0' + path.read_bytes())
  # This project's own metadata (an editable install's, or the egg-info its source folder
  # holds when that folder is on sys.path) adds nothing: its sources are above.
  dists = [d for d in importlib.metadata.distributions()
           if _normalized(d.metadata['Name'] or '') != _PACKAGE_DIST]
  for dist in sorted(dists, key=lambda d: (_normalized(d.metadata['Name'] or ''), d.version)):
    name = dist.metadata['Name']
    direct_url = json.loads(dist.read_text('direct_url.json') or '{}')
    if direct_url.get('dir_info', {}).get('editable'):
      logging.info('%s is installed editable: compiled programs are not cached.', name)
      return None
    digest.update(f'{name}=={dist.version}\n{dist.read_text("RECORD") or ""}'.encode())
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


def _key(name: str, args, settings) -> str | None:
  code = _installed_code()
  if code is None:
    return None
  devices = jax.devices()
  parts = {
      'name': name, 'code': code, 'python': sys.version, 'cpu': _host_cpu(),
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
      try:
        os.remove(self.path)
      except OSError:
        pass
      return None
    os.utime(self.path)  # The newest-used programs are the ones kept.
    return compiled

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
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, suffix='.tmp', delete=False) as f:
      f.write(blob)
    os.replace(f.name, self.path)
    programs = sorted(pathlib.Path(directory).glob(f'*{_SUFFIX}'),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for old in programs[MAX_PROGRAMS:]:
      old.unlink(missing_ok=True)


def cached_program(name: str, args, **settings) -> CachedProgram | None:
  """Where the program ``name`` compiled for ``args`` (arrays or ShapeDtypeStructs, with their
  shardings) and ``settings`` (everything else it is built from that the code does not fix,
  e.g. the config) is kept: ``programs/`` in JAX's compilation cache directory. None where
  nothing is cached: no compilation cache set, several processes, or code the key cannot
  cover."""
  cache_dir = jax.config.values.get('jax_compilation_cache_dir')
  if not cache_dir or jax.process_count() > 1:
    return None
  key = _key(name, args, settings)
  if key is None:
    return None
  return CachedProgram(os.path.join(cache_dir, 'programs', f'{name}-{key[:32]}{_SUFFIX}'),
                       args)
