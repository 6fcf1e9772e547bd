"""Imports PyTorch weights: torchvision's ImageNet DenseNet-121 and official 2HDED:NET models.

  python -m hded_jax.convert imagenet densenet121.pth OUT_DIR
  python -m hded_jax.convert official 2hded.pth.tar OUT_DIR [--aif_tanh] [--depth_scale=1.0]
      [--heads=depth,aif]

``imagenet`` writes an encoder init for ``config.init_from = 'imagenet:OUT_DIR'`` (its
manifest.json lists the imported and the skipped torchvision tensors); ``official`` writes a model
checkpoint (step 0) that eval.py and predict.py read. Needs torch (`pip install -e '.[torch]'`).
"""

import os

from absl import app
from absl import flags
from absl import logging

from hded_jax import checkpoints
from hded_jax import models
from hded_jax import runtime
from hded_jax.pytorch import weights

FLAGS = flags.FLAGS
flags.DEFINE_bool('aif_tanh', False, 'official: the model squashes its AiF output with tanh.')
flags.DEFINE_float('depth_scale', 1.0, 'official: metres per unit of the depth output.')
flags.DEFINE_list('heads', None, 'official: heads to keep (default: all in the checkpoint).')
flags.DEFINE_bool('allow_pickle', False,
                  'Let torch.load unpickle arbitrary objects (only for files you trust).')

USAGE = ('usage: python -m hded_jax.convert imagenet IN.pth OUT_DIR\n'
         '       python -m hded_jax.convert official IN.pth.tar OUT_DIR [--aif_tanh] '
         '[--depth_scale=1.0] [--heads=depth,aif]')


def main(argv):
  if len(argv) != 4 or argv[1] not in ('imagenet', 'official'):
    raise app.UsageError(USAGE)
  runtime.skip_unused_cuda_check()
  runtime.readable_logs()
  kind, in_path, out_dir = argv[1:]
  if kind == 'imagenet':
    state_dict = weights.read_torch_state_dict(in_path, allow_pickle=FLAGS.allow_pickle)
    loaded = weights.convert_imagenet(state_dict, out_dir, source=os.path.abspath(in_path))
    logging.info('Imported %d encoder tensors into %s (see %s for what was skipped).',
                 len(loaded), out_dir, checkpoints.MANIFEST)
  else:
    config = weights.write_official(
        in_path, out_dir, heads=FLAGS.heads, aif_tanh=FLAGS.aif_tanh,
        depth_scale=FLAGS.depth_scale, allow_pickle=FLAGS.allow_pickle)
    model = config.model
    logging.info('Wrote %s: heads %s, block sizes %s, growth rate %d, aif_tanh=%s, '
                 'depth_scale=%g; %d parameters.', out_dir, ','.join(model.heads),
                 tuple(model.block_sizes), model.growth_rate, model.aif_tanh, model.depth_scale,
                 models.count_params(model))


if __name__ == '__main__':
  app.run(main)
