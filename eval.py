"""Evaluates a training run's checkpoints as they appear (beside `train.py`).

  python eval.py --config=configs/nyu.py --workdir=/tmp/hded_nyu          # follow the run
  python eval.py --workdir=/tmp/hded_nyu --once                            # newest only
  python eval.py --workdir=/tmp/hded_nyu/best_checkpoint --once            # any checkpoint
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from hded_jax import eval_lib
from hded_jax import runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Data/eval settings; default: the config saved with the checkpoints.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'The training run\'s --workdir; with --once also any '
                    'checkpoint directory (WORKDIR/best_checkpoint) or step (DIR/<step>).')
flags.DEFINE_bool('once', False, 'Evaluate the newest checkpoint now and exit (never waits).')
flags.DEFINE_float('timeout_secs', 3600, 'How long to wait for a new checkpoint before stopping.')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.readable_logs()
  runtime.setup(eval_lib.run_dir(FLAGS.workdir, once=FLAGS.once), training=False,
                distributed=False)
  eval_lib.evaluate(FLAGS.config, FLAGS.workdir, once=FLAGS.once,
                    timeout_secs=FLAGS.timeout_secs)


if __name__ == '__main__':
  app.run(main, flags_parser=runtime.parse_flags)
