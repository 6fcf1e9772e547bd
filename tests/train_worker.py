"""Runs the tiny training job in a fresh process (device count and multi-host set by the caller).

  python -m tests.train_worker DATA_DIR WORKDIR NUM_STEPS BATCH_SIZE
"""

import sys

import jax

from hded_jax import runtime
from hded_jax import train_lib
from tests.conftest import tiny_config


def main(data_dir: str, workdir: str, num_steps: str, batch_size: str) -> None:
  runtime.setup(workdir)
  config = tiny_config(data_dir, num_train_steps=int(num_steps), batch_size=int(batch_size),
                       checkpoint_every_steps=int(num_steps))
  state = train_lib.train(config, workdir)
  print(f'final step {int(state.step)} on {jax.device_count()} devices in '
        f'{jax.process_count()} processes')


if __name__ == '__main__':
  main(*sys.argv[1:])
