"""Files written whole or not at all: whoever reads one (eval.py following a run, a restart, a
user opening the benchmark's JSON or a prediction) never finds it cut off by a kill, a time
limit or a full disk. And paths checked before any work: local, and writable."""

from collections.abc import Iterator
import contextlib
import os
import threading
from typing import IO



@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w') -> Iterator[IO]:
  """A new file beside ``path`` (its folder made if missing) that replaces ``path`` in one
  rename when the block ends, and is removed if the block fails. Its permissions follow the
  umask, as ``open``'s do."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temporary = f'{path}.{os.getpid()}-{threading.get_ident()}.tmp'
  try:
    with open(temporary, mode) as f:
      yield f
    os.replace(temporary, path)
  except BaseException:
    if os.path.lexists(temporary):  # A read-only file system refuses even a missing one's unlink.
      os.unlink(temporary)
    raise


def not_local(path: str) -> str | None:
  """Why ``path`` is no local path (a URL), or None. This package reads and writes through the
  operating system's files, where gs://bucket/run would name a local folder 'gs:'."""
  if '://' not in path:
    return None
  return (f'{path} is a URL: hded-jax reads and writes local paths only. Mount the bucket and '
          'pass the path under the mount (for Cloud Storage: `gcsfuse --implicit-dirs BUCKET '
          '/mnt/BUCKET`, then /mnt/BUCKET/...; on several hosts, the same mount on each).')


def unwritable(path: str, *, folder: bool = False) -> str | None:
  """Why ``path`` (a file, or with ``folder`` a folder made if missing) cannot be written, or
  None: for a program to stop on its output flag before the work, not after it."""
  if reason := not_local(path):
    return reason
  path = os.path.expanduser(path)
  if os.path.exists(path) and os.path.isdir(path) != folder:
    return (f'{path} is a {"file" if folder else "folder"}: give a '
            f'{"folder" if folder else "file"} path.')
  existing = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f'{existing} is a file, so {path} cannot be made.'
  if not os.access(existing, os.W_OK | os.X_OK):
    return (f'{existing} is not writable (a read-only file system, or no permission): pass a '
            'writable location.')
  return None
