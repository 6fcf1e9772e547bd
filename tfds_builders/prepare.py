r"""Builds a defocus dataset into a TFDS data_dir.

  python -m tfds_builders.prepare nyu_depth_v2_defocus --manual_dir=DIR --data_dir=DIR \
      [--config=focus_4m]

Missing manual source files fail here, before any work starts, with a list of what is expected
and where to get it.

TFDS writes a dataset into an `incomplete.*` folder next to its final one and renames it only
after every split and the metadata are written, so an interrupted build never looks prepared.
"""

import importlib
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath

from tfds_builders import common

# Dataset name -> module that registers its builder.
BUILDER_MODULES = {
    'nyu_depth_v2_defocus': 'tfds_builders.nyu_depth_v2_defocus',
    'make3d_defocus': 'tfds_builders.make3d_defocus',
    'synthetic_defocus': 'tfds_builders.synthetic_defocus',
}


def prepare(
    name: str, *, data_dir: epath.PathLike, manual_dir: epath.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None,
) -> tfds.core.DatasetBuilder:
  """Builds `name` (one of BUILDER_MODULES) into data_dir and returns its builder.

  The files are array_record, which the input pipeline reads with random access.
  """
  if name not in BUILDER_MODULES:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(BUILDER_MODULES)}.')
  importlib.import_module(BUILDER_MODULES[name])
  builder = tfds.builder(name, config=config, data_dir=data_dir, file_format='array_record')
  if builder.is_prepared():
    logging.info('%s is already prepared in %s.', builder.info.full_name, builder.data_dir)
    return builder
  if manual_dir is None:
    # TFDS's own default location.
    manual_dir = epath.Path(data_dir) / 'downloads' / 'manual'
  manual_files = getattr(builder, 'MANUAL_FILES', None)
  if manual_files:
    common.check_manual_files(manual_dir, manual_files, name)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  logging.info('Prepared %s in %s: %s', builder.info.full_name, builder.data_dir,
               {split: info.num_examples for split, info in builder.info.splits.items()})
  return builder


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f'Give exactly one dataset name, one of {sorted(BUILDER_MODULES)}.')
  try:
    prepare(argv[1], data_dir=FLAGS.data_dir, manual_dir=FLAGS.manual_dir,
            config=FLAGS.config)
  except FileNotFoundError as e:
    sys.exit(f'Error: {e}')  # A message to act on, not a traceback.


if __name__ == '__main__':
  # Flags are defined here, not on import: tests import this module beside other entry points.
  flags.DEFINE_string('manual_dir', None, 'Folder holding the manually downloaded source files '
                      '(default: <data_dir>/downloads/manual).')
  flags.DEFINE_string('data_dir', None, 'TFDS data_dir to write the dataset into.',
                      required=True)
  flags.DEFINE_string('config', None, 'Builder config, e.g. focus_4m (default: the '
                      "builder's default config).")
  app.run(main)
