"""Evaluates a training run's checkpoints as they appear (beside `train.py`).

  python eval.py --config=configs/nyu.py --workdir=/tmp/hded_nyu          # follow the run
  python eval.py --workdir=/tmp/hded_nyu --once                            # newest only
  python eval.py --workdir=/tmp/hded_nyu/best_checkpoint --once            # any checkpoint
  python eval.py --workdir=/mnt/shared/run --once --output_dir=/tmp/ev     # read-only checkpoints
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from hded_jax import command_line
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
flags.DEFINE_string('output_dir', None, 'Write the results (eval/) and the compilation cache '
                    'here instead of beside the checkpoints, e.g. for checkpoints in a read-only '
                    'place; the best checkpoint is then not kept.')
flags.mark_flag_as_required('workdir')
command_line.validate_output_flag('output_dir', folder=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.readable_logs()
  runtime.setup(eval_lib.run_dir(FLAGS.workdir, once=FLAGS.once, output_dir=FLAGS.output_dir),
                training=False, distributed=False)
  eval_lib.evaluate(FLAGS.config, FLAGS.workdir, once=FLAGS.once,
                    timeout_secs=FLAGS.timeout_secs, output_dir=FLAGS.output_dir)


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
