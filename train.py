"""Trains 2HDED:NET. Rerunning the same command resumes from WORKDIR's latest checkpoint.

  python train.py --config=configs/nyu.py --workdir=/tmp/hded_nyu --config.batch_size=8
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hded_jax import command_line
from hded_jax import runtime
from hded_jax import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and TensorBoard logs.')
flags.mark_flags_as_required(['config', 'workdir'])
command_line.validate_output_flag('workdir', folder=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.readable_logs()
  runtime.setup(FLAGS.workdir, training=True)
  logging.info('Config:\n%s', FLAGS.config)
  train_lib.train(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
