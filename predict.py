"""Predicts depth and the all-in-focus image for image files (see hded_jax/predict_lib.py).

  python predict.py --checkpoint=/tmp/hded_nyu/checkpoints --input=photos/ --output_dir=/tmp/out
  python predict.py --checkpoint=CKPT --input='photos/*.jpg' --output_dir=OUT --resize=256x256

--input: an image file, a folder of images or a quoted glob. Writes <stem>_depth.{npy,png} and
<stem>_aif.{npy,png} at each input's own size; files that cannot be read are logged and skipped.
"""

import os

from absl import app
from absl import flags
from absl import logging

from hded_jax import command_line
from hded_jax import predict_lib
from hded_jax import runtime

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None,
                    'Checkpoint directory (a training run\'s WORKDIR/checkpoints, the run\'s '
                    'WORKDIR, WORKDIR/best_checkpoint or `python -m hded_jax.convert official` '
                    'output; its newest step that restores) or one step of one (DIR/<step>).')
flags.DEFINE_string('input', None, 'Image file, folder of images, or glob.')
flags.DEFINE_string('output_dir', None, 'Where to write the predictions.')
flags.DEFINE_integer('batch_size', 8, 'At most this many images per forward pass (images that '
                     'pad to the same size are batched); lower it if memory runs out.')
flags.DEFINE_string('resize', '', 'HxW: resize inputs to this size (e.g. the training size, '
                    '256x256) and the outputs back; default: run at the input size.')
flags.DEFINE_enum('pad_mode', 'reflect', predict_lib.PAD_MODES,
                  'How inputs are padded to a multiple of 32 (the outputs are cropped back).')
flags.DEFINE_list('depth_range', None, 'MIN,MAX depth for the colour map; default: per image.')
flags.DEFINE_list('camera', None, 'FOCAL_LENGTH,F_NUMBER,PIXEL_SIZE,FOCUS_DISTANCE (metres) of '
                  'the photos: needed by models trained with model.camera_input=True.')
flags.mark_flags_as_required(['checkpoint', 'input', 'output_dir'])
command_line.validate_output_flag('output_dir', folder=True)


def _numbers(name: str) -> tuple[float, ...] | None:
  if not FLAGS[name].value:
    return None
  try:
    return tuple(float(v) for v in FLAGS[name].value)
  except ValueError as error:
    raise app.UsageError(f'--{name}={",".join(FLAGS[name].value)}: {error}; give plain numbers '
                         '(metres), e.g. 5.6e-6, not 5.6um.') from error


def main(argv):
  if len(argv) > 1:
    files_given = [arg for arg in argv[1:] if os.path.exists(arg)]
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}' + (
        " (the shell expanded a glob into these files: quote it, e.g. --input='photos/*.jpg')"
        if files_given else ''))
  runtime.readable_logs()
  runtime.tune_for_platform(training=False)
  depth_range = _numbers('depth_range')
  if depth_range:
    if len(depth_range) != 2:
      raise app.UsageError(f'--depth_range={FLAGS.depth_range}: expected MIN,MAX.')
    if not depth_range[1] > depth_range[0]:
      raise app.UsageError(f'--depth_range={FLAGS.depth_range}: MAX must exceed MIN.')
  report = predict_lib.run(
      FLAGS.checkpoint, FLAGS.input, FLAGS.output_dir, batch_size=FLAGS.batch_size,
      resize=predict_lib.parse_resize(FLAGS.resize), pad_mode=FLAGS.pad_mode,
      depth_range=depth_range, camera=_numbers('camera'))
  logging.info('Wrote predictions for %d image(s) to %s; skipped %d.', len(report.written),
               FLAGS.output_dir, len(report.skipped))
  if not report.written:
    raise SystemExit(f'No image could be read; nothing written to {FLAGS.output_dir}.')


if __name__ == '__main__':
  app.run(main)
