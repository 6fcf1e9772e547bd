"""Runs the tiny training job in a fresh process (device count and multi-host set by the caller).

  python -m tests.train_worker DATA_DIR WORKDIR NUM_STEPS BATCH_SIZE [CHECKPOINT_EVERY_STEPS
      [FOCUS_LOW,FOCUS_HIGH]]

The last argument renders the inputs with focus distances drawn from that range.
"""

import os
import subprocess
import sys

import jax

from hded_jax import runtime
from hded_jax import train_lib
from tests.conftest import REPO
from tests.conftest import forced_devices_xla_flags
from tests.conftest import tiny_config


def main(data_dir: str, workdir: str, num_steps: str, batch_size: str,
         checkpoint_every_steps: str | None = None, focus_range: str | None = None) -> None:
  runtime.setup(workdir, training=True)
  config = tiny_config(data_dir, num_train_steps=int(num_steps), batch_size=int(batch_size),
                       checkpoint_every_steps=int(checkpoint_every_steps or num_steps))
  if focus_range:
    config.dataset.camera.focus_distance = tuple(float(v) for v in focus_range.split(','))
  state = train_lib.train(config, workdir)
  print(f'final step {int(state.step)} on {jax.device_count()} devices in '
        f'{jax.process_count()} processes')


def launch(data_dir, workdir, *, num_steps, batch_size, devices=1, checkpoint_every_steps=None,
           focus_range=None, extra_env=None) -> subprocess.Popen:
  """Starts this worker in a fresh process on ``devices`` forced CPU devices, with this
  process's other XLA flags (the tests' optimisation level: `conftest.py`)."""
  env = dict(os.environ, XLA_FLAGS=forced_devices_xla_flags(devices), PYTHONPATH=REPO,
             JAX_PLATFORMS='cpu', **(extra_env or {}))
  args = [data_dir, workdir, str(num_steps), str(batch_size),
          str(checkpoint_every_steps or num_steps)]
  if focus_range:
    args.append(','.join(map(str, focus_range)))
  return subprocess.Popen([sys.executable, '-m', 'tests.train_worker', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
  """Waits for a launched worker; its output, or a failure that shows the output's end."""
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-5000:]
  return out


if __name__ == '__main__':
  main(*sys.argv[1:])
