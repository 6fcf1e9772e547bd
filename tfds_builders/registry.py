"""The one list of the project's datasets, and `prepare`, which builds one of them.

Importing this module registers every builder with TFDS; a new dataset is added here only.
"""

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_builders import common
from tfds_builders import make3d_defocus
from tfds_builders import nyu_depth_v2_defocus
from tfds_builders import synthetic_defocus

# Dataset name -> builder class.
DATASETS: dict[str, type[common.DefocusBuilder]] = {
    'nyu_depth_v2_defocus': nyu_depth_v2_defocus.Builder,
    'make3d_defocus': make3d_defocus.Builder,
    'synthetic_defocus': synthetic_defocus.Builder,
}


def builder(name: str, *, data_dir: epath.PathLike | None = None,
            config: str | tfds.core.BuilderConfig | None = None,
            num_workers: int = 1) -> common.DefocusBuilder:
  """The builder of dataset `name` (one of DATASETS) reading and writing array_record files."""
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.')
  configs = [c.name for c in DATASETS[name].BUILDER_CONFIGS]
  if isinstance(config, str) and config and config not in configs:
    # TFDS's own error suggests names "that closely match", and lists none for these.
    raise ValueError(f'Unknown config {config!r} of {name}; choose one of {configs}.')
  return DATASETS[name](data_dir=data_dir, config=config or None, file_format='array_record',
                        num_workers=num_workers)


def needs_manual_files(name: str) -> bool:
  return bool(getattr(DATASETS[name], 'MANUAL_FILES', None))


def prepare_command(builder: common.DefocusBuilder) -> str:
  """The command line that prepares `builder`'s dataset and config where it looks for it."""
  command = (f'python -m tfds_builders.prepare {builder.name} '
             f'--config={builder.builder_config.name} --data_dir={builder.data_dir_root}')
  if needs_manual_files(builder.name):
    command += ' --manual_dir=DIR_WITH_THE_DOWNLOADED_FILES'
  return command


def prepare(
    name: str, *, data_dir: epath.PathLike, manual_dir: epath.PathLike | None = None,
    config: str | tfds.core.BuilderConfig | None = None, num_workers: int = 1,
) -> common.DefocusBuilder:
  """Builds `name` (one of DATASETS) into data_dir and returns its builder.

  Missing manual files fail here, before any work starts, with a list of what is expected and
  where to get it. TFDS writes into an `incomplete.*` folder next to the final one and renames
  it only once every split and the metadata are written, so an interrupted build never looks
  prepared. `num_workers` processes render the examples (the same examples for any number).
  """
  dataset = builder(name, data_dir=data_dir, config=config, num_workers=num_workers)
  if dataset.is_prepared():
    logging.info('%s is already prepared in %s.', dataset.info.full_name, dataset.data_dir)
    return dataset
  if manual_dir is None:
    # TFDS's own default location.
    manual_dir = epath.Path(data_dir) / 'downloads' / 'manual'
  if needs_manual_files(name):
    common.check_manual_files(manual_dir, DATASETS[name].MANUAL_FILES, name)
  logging.info('Preparing %s in %s with %d worker process(es).', dataset.info.full_name,
               dataset.data_dir_root, num_workers)
  dataset.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  logging.info('Prepared %s in %s: %s', dataset.info.full_name, dataset.data_dir,
               {split: info.num_examples for split, info in dataset.info.splits.items()})
  return dataset
