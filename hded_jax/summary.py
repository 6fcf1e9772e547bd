"""Prints the model's parameters per module and in total, without allocating them.

  python -m hded_jax.summary --config=configs/nyu.py
"""

import collections

from absl import app
from absl import flags
import jax
from flax import nnx
from ml_collections import config_flags

from hded_jax import models

FLAGS = flags.FLAGS


def parameter_table(model_config, depth: int = 2) -> list[tuple[str, int]]:
  """[(module path, parameter count)] sorted by path, grouped ``depth`` levels deep."""
  abstract = nnx.eval_shape(lambda: models.create_model(model_config))
  counts = collections.OrderedDict()
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      nnx.state(abstract, nnx.Param).to_pure_dict())[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    name = '.'.join(keys[:min(depth, len(keys) - 1)])
    counts[name] = counts.get(name, 0) + leaf.size
  return list(counts.items())


def format_table(rows: list[tuple[str, int]]) -> str:
  width = max(len(name) for name, _ in rows)
  lines = [f'{"module":<{width}}  {"parameters":>12}']
  lines += [f'{name:<{width}}  {count:>12,}' for name, count in rows]
  lines.append(f'total parameters: {sum(count for _, count in rows)}')
  return '\n'.join(lines)


def main(argv):
  del argv
  print(format_table(parameter_table(FLAGS.config.model, FLAGS.depth)))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('depth', 2, 'Module nesting depth of the table rows.')
  flags.mark_flag_as_required('config')
  app.run(main)
