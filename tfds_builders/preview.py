r"""Shows what a defocus dataset holds: one row per example, written as a PNG.

  python -m tfds_builders.preview synthetic_defocus --output=grid.png
  python -m tfds_builders.preview nyu_depth_v2_defocus --config=focus_4m --split=test --num=4 \
      --data_dir=DATA --output=nyu.png [--focus_distance=3]

Each row: the defocused input, the all-in-focus image, the depth (colour map with its range in
metres), the blur map (sigma in the camera's pixels, blue in front of the focal plane, red
behind; grey where the depth is invalid) and |input - all-in-focus|, with the camera beneath.
Examples are shown at the resolution the dataset stores. With camera flags the input is
rendered with that camera, as training renders it with `config.dataset.camera`. The synthetic
dataset builds itself on first use; the others say how to prepare them.
"""

import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from hded_jax import command_line
from hded_jax import defocus
from hded_jax import files
from hded_jax import images
from hded_jax import input_pipeline
from hded_jax import runtime
from hded_jax import visualize
from tfds_builders import registry

_CONFIG = flags.DEFINE_string('config', None, "Builder config (default: the builder's default).")
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to show.')
_NUM = flags.DEFINE_integer('num', 8, 'Examples (rows) to show: the split\'s first ones.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir (default: TFDS\'s own).')
_OUTPUT = flags.DEFINE_string('output', None, 'Where to write the PNG.', required=True)
_MIN_PANEL = flags.DEFINE_integer('min_panel_size', 128, 'Small images are enlarged (nearest '
                                  'neighbour, a whole factor) to at least this many pixels.')
_CAMERA = {name: flags.DEFINE_float(name, None, f'Render with this {name} instead of the '
                                   "example's own (metres; f_number a ratio).")
           for name in defocus.CAMERA_FIELDS}
command_line.validate_output_flag('output')
flags.register_validator('output', lambda path: path.lower().endswith('.png'),
                         'the preview is a PNG: give a path ending in .png.')


def load_builder(name: str, config: str | None, data_dir: str | None):
  """The prepared builder; a dataset without manual files (synthetic) is built first."""
  builder = registry.builder(name, data_dir=data_dir, config=config)
  if not builder.is_prepared():
    if registry.needs_manual_files(name):
      raise FileNotFoundError(
          f'{name}/{builder.builder_config.name} is not prepared in {builder.data_dir_root}. '
          f'Prepare it first: `{registry.prepare_command(builder)}`.')
    builder = registry.prepare(name, data_dir=builder.data_dir_root, config=config,
                               num_workers=runtime.usable_cores())
  return builder


def preview_rows(builder, split: str, num: int, camera: dict[str, float] | None = None,
                 min_panel_size: int = 128) -> list[visualize.Row]:
  """Rows of the split's first ``num`` examples, rendered with ``camera`` (its set fields
  replace the examples' own) if given."""
  source = builder.as_data_source(split=split)
  if not 0 < num <= len(source):
    raise ValueError(f'--num={num}: the {split} split has {len(source)} examples.')
  size = tuple(builder.info.features['image'].shape[:2])
  choice = input_pipeline.CameraChoice.from_config(camera or {})
  preprocess = input_pipeline.Preprocess(
      size, native_depth=True, camera=choice,
      fill_depth=getattr(builder.builder_config, 'max_depth', None))
  rendering = input_pipeline.builder_rendering(builder, size)
  render = jax.jit(lambda example: rendering(jax.tree.map(lambda v: v[None], example))[
      'image'][0])
  zoom = max(1, -(-min_panel_size // min(size)))
  rows = []
  for i in range(num):
    example = preprocess(source[i])
    if choice is not None:
      example['image'] = np.asarray(render(example))
    caption = (f'#{int(source[i]["index"])}: ' + visualize.camera_caption(
        dict(zip(defocus.CAMERA_FIELDS, example['camera']))) +
               (' (rendered here)' if choice is not None else ''))
    rows.append(visualize.example_row(
        images.to_uint8(example['image']), images.to_uint8(example['aif']), example['depth'],
        example['blur'], caption, (size[0] * zoom, size[1] * zoom)))
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError(f'Give exactly one dataset name, one of {sorted(registry.DATASETS)}.')
  runtime.skip_unused_cuda_check()
  try:
    builder = load_builder(argv[1], _CONFIG.value, _DATA_DIR.value)
    camera = {name: flag.value for name, flag in _CAMERA.items() if flag.value is not None}
    rows = preview_rows(builder, _SPLIT.value, _NUM.value, camera, _MIN_PANEL.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'Error: {e}')  # A message to act on, not a traceback.
  grid, _ = visualize.stack_rows(rows)
  with files.atomic_write(_OUTPUT.value, 'wb') as f:
    Image.fromarray(grid).save(f, format='PNG')
  print(f'Wrote {len(rows)} examples of {builder.info.full_name} {_SPLIT.value} to '
        f'{_OUTPUT.value}.')


if __name__ == '__main__':
  app.run(main)
