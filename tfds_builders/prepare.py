r"""Builds a defocus dataset into a TFDS data_dir.

  python -m tfds_builders.prepare nyu_depth_v2_defocus --manual_dir=DIR --data_dir=DIR \
      [--config=focus_4m] [--num_workers=16]

Missing manual source files fail here, before any work starts, with a list of what is expected
and where to get it; an interrupted build never looks prepared (`registry.prepare`).
"""

import sys
from collections.abc import Sequence

from absl import app, flags

from hded_jax import runtime
from tfds_builders import registry

_MANUAL_DIR = flags.DEFINE_string(
    'manual_dir', None,
    'Folder holding the manually downloaded source files (default: <data_dir>/downloads/manual).')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write the dataset into.',
                                required=True)
_CONFIG = flags.DEFINE_string(
    'config', None, "Builder config, e.g. focus_4m (default: the builder's default config).")
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', None, 'Processes that render the examples (default: one per CPU core).')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f'Give exactly one dataset name, one of {sorted(registry.DATASETS)}.')
  runtime.skip_unused_cuda_check()
  try:
    registry.prepare(argv[1], data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value,
                     config=_CONFIG.value,
                     num_workers=_NUM_WORKERS.value or runtime.usable_cores())
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'Error: {e}')  # A message to act on, not a traceback.


if __name__ == '__main__':
  app.run(main)
