"""Process set-up: the allocator setting and the compilation cache across restarts."""

import functools
import os
import shutil
import subprocess
import sys

from tests.train_worker import finish
from tests.train_worker import launch
from tests.train_worker import REPO

# Allocates, writes and frees 256 MiB twice in a thread with malloc (as XLA does with its
# temporaries; numpy would ask for huge pages) and prints the page faults each round took.
_ALLOCATE_TWICE = '''
import ctypes, ctypes.util, resource, sys, threading
libc = ctypes.CDLL(ctypes.util.find_library('c'))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == 'keep':
  from hded_jax import runtime
  assert runtime.keep_freed_memory()
faults = []
def work():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(*faults)
'''


def _faults(mode):
  out = subprocess.run([sys.executable, '-c', _ALLOCATE_TWICE, mode], cwd=REPO, check=True,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
  return [int(v) for v in out.stdout.split()]


def test_freed_memory_is_reused_without_page_faults():
  # 256 MiB is 65536 pages of 4 KiB. glibc's default unmaps the block on free, so the second
  # allocation faults every page in again (unless the kernel backs it with huge pages).
  _, second = _faults('default')
  if not _huge_pages_always():
    assert second > 50_000
  _, second = _faults('keep')
  assert second < 5_000


def _huge_pages_always():
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[always]' in f.read()
  except OSError:
    return False


def test_restart_recompiles_nothing(tiny_data_dir, tmp_path):
  """A resumed run finds every program it compiles in the workdir's persistent cache."""
  workdir = str(tmp_path / 'run')
  # The cache goes to WORKDIR/jax_cache unless the variable names another place.
  run = functools.partial(launch, tiny_data_dir, workdir, num_steps=4, batch_size=4,
                          checkpoint_every_steps=2, extra_env={'HDED_JAX_CACHE_DIR': ''})
  finish(run())
  cache = os.path.join(workdir, 'jax_cache')
  compiled = sorted(os.listdir(cache))
  assert any(name.startswith('jit_train_step') for name in compiled)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))  # As if preempted after step 2.
  out = finish(run())
  assert 'final step 4' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))  # It trained steps 3 and 4.
  assert sorted(os.listdir(cache)) == compiled  # Every cache key was there already.
