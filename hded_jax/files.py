"""Files written whole or not at all: whoever reads one (eval.py following a run, a restart, a
user opening the benchmark's JSON or a prediction) never finds it cut off by a kill, a time
limit or a full disk."""

from collections.abc import Iterator
import contextlib
import os
import pathlib
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
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise
