"""What the defocus builders share: their features and the manual-download check."""

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

CAMERA_KEYS = ('focal_length', 'f_number', 'pixel_size', 'focus_distance')


def defocus_features(image_shape: Sequence[int], depth_shape: Sequence[int]):
  """The features every defocus builder yields; the training input pipeline relies on them."""
  image_shape = (*image_shape, 3)
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=image_shape, doc='Defocused rendering of `aif`.'),
      'aif': tfds.features.Image(shape=image_shape, doc='All-in-focus (sharp) image.'),
      'depth': tfds.features.Tensor(
          shape=tuple(depth_shape), dtype=np.float32, encoding=tfds.features.Encoding.ZLIB,
          doc='Depth in metres; 0 marks pixels without valid ground truth.'),
      'camera': tfds.features.FeaturesDict(
          {key: tfds.features.Scalar(np.float32) for key in CAMERA_KEYS},
          doc='Thin-lens camera used for the rendering (metres).'),
      'index': tfds.features.Scalar(np.int64, doc='Index in the source file / archive order.'),
  })


def check_manual_files(
    manual_dir: epath.PathLike, files: Mapping[str, str], dataset: str
) -> dict[str, epath.Path]:
  """Returns {file name: path} for `files` ({name: where to get it}), or says what is missing."""
  manual_dir = epath.Path(manual_dir)
  missing = [name for name in files if not (manual_dir / name).is_file()]
  if missing:
    expected = '\n'.join(f'  {name}  <- {source}' for name, source in files.items())
    if manual_dir.is_dir():
      present = sorted(path.name for path in manual_dir.iterdir())
      found = f'That folder holds: {present or "nothing"}.'
    else:
      found = 'That folder does not exist.'
    raise FileNotFoundError(
        f'{dataset}: missing {", ".join(missing)} in the manual folder {manual_dir}.\n'
        f'{found}\nExpected files (name <- where to get it):\n{expected}\n'
        f'Download them there, or pass --manual_dir=<the folder that holds them>.')
  return {name: manual_dir / name for name in files}
