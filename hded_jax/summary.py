"""Prints the model's parameters per module and in total, without allocating them.

  python -m hded_jax.summary --config=configs/nyu.py [--depth=2]
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from hded_jax import command_line
from hded_jax import models
from hded_jax import runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_integer('depth', 2, 'Module nesting depth of the table rows.')
flags.mark_flag_as_required('config')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.skip_unused_cuda_check()
  rows = models.parameter_table(FLAGS.config.model, FLAGS.depth)
  width = max(len(name) for name, _ in rows)
  print(f'{"module":<{width}}  {"parameters":>12}')
  for name, count in rows:
    print(f'{name:<{width}}  {count:>12,}')
  print(f'total parameters: {sum(count for _, count in rows)}')


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
