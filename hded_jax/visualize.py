"""Pictures for people: colour maps (without matplotlib), example rows with their scales (the
dataset preview, `python -m tfds_builders.preview`) and the eval panels in TensorBoard."""

from collections.abc import Mapping, Sequence
import dataclasses

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hded_jax import defocus
from hded_jax import images

# Turbo (Mikhailov, Google 2019) as its published degree-5 polynomial fit per channel.
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def turbo(x: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> float RGB in [0, 1] (shape + (3,))."""
  x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)
  channels = [np.polynomial.polynomial.polyval(x, c) for c in (_TURBO_R, _TURBO_G, _TURBO_B)]
  return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def diverging(x: np.ndarray) -> np.ndarray:
  """Values in [-1, 1] -> float RGB in [0, 1]: blue below 0, white at 0, red above."""
  x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)[..., None]
  blue, white, red = (np.array(c) for c in ((0.23, 0.30, 0.75), (1.0, 1.0, 1.0),
                                            (0.71, 0.02, 0.15)))
  return np.where(x < 0, white + (blue - white) * -x, white + (red - white) * x)


def grey(x: np.ndarray) -> np.ndarray:
  """Values in [0, 1] -> float RGB in [0, 1], black to white."""
  return np.repeat(np.clip(np.asarray(x, np.float64), 0.0, 1.0)[..., None], 3, axis=-1)


COLOUR_MAPS = {'turbo': turbo, 'diverging': diverging, 'grey': grey}
# Masked pixels (no valid depth) in the depth and blur panels: a grey neither map uses.
MASKED = (128, 128, 128)
# The example row's panels, left to right.
PANELS = ('defocused input', 'all-in-focus', 'depth (m)', 'blur sigma (px)', '|input - AiF|')
# What the ends of a panel's colour bar mean, beside their values.
_BAR_ENDS = {PANELS[3]: (' near', ' far'), PANELS[4]: ('', ' grey levels')}
PANEL_GAP, BAR_HEIGHT, TEXT_HEIGHT = 4, 8, 14


@dataclasses.dataclass(frozen=True)
class Scale:
  """A panel's colour map over [vmin, vmax]."""
  colour_map: str
  vmin: float
  vmax: float

  def colours(self, values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB of ``values``; invalid pixels are ``MASKED``."""
    span = self.vmax - self.vmin if self.vmax > self.vmin else 1.0
    unit = (np.asarray(values, np.float64) - self.vmin) / span
    if self.colour_map == 'diverging':
      unit = unit * 2 - 1
    rgb = images.unit_to_uint8(COLOUR_MAPS[self.colour_map](unit))
    if valid is not None:
      rgb[~np.asarray(valid, bool)] = MASKED
    return rgb


def colorize_depth(depth: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
  """Depth (..., H, W) -> uint8 RGB (..., H, W, 3); near is blue, far is red."""
  return Scale('turbo', vmin, vmax).colours(depth)


@dataclasses.dataclass(frozen=True)
class Row:
  """One example as pictures: ``image`` (uint8) holds the ``PANELS`` side by side, colour bars
  with their ranges beneath the colour-mapped ones and a caption; ``boxes`` gives each panel's
  (top, left, height, width) in ``image``, ``scales`` the colour-mapped panels' scales."""
  image: np.ndarray
  boxes: dict[str, tuple[int, int, int, int]]
  scales: dict[str, Scale]


def example_scales(depth: np.ndarray, blur: np.ndarray,
                   difference: np.ndarray) -> dict[str, Scale]:
  """The scales of an example's depth (its valid range), blur (symmetric about 0, to its
  largest |sigma|) and difference (0 to its largest) panels."""
  valid = depth > 0
  d = depth[valid] if valid.any() else np.zeros(1)
  limit = max(float(np.abs(blur[valid]).max()) if valid.any() else 0.0, 1e-3)
  return {PANELS[2]: Scale('turbo', float(d.min()), float(d.max())),
          PANELS[3]: Scale('diverging', -limit, limit),
          PANELS[4]: Scale('grey', 0.0, max(float(difference.max()), 1.0))}


def example_row(image: np.ndarray, aif: np.ndarray, depth: np.ndarray, blur: np.ndarray,
                caption: str, size: tuple[int, int]) -> Row:
  """The ``PANELS`` of one example at ``size`` (H, W) each (nearest neighbour).

  Args:
    image, aif: uint8 (h, w, 3): the defocused input and the all-in-focus image.
    depth: metres on any grid, 0 where invalid (masked in the depth and blur panels).
    blur: signed blur sigma in pixels on the depth's grid (``input_pipeline.blur_map``).
    caption: the text under the panels (e.g. the camera).
    size: each panel's display size.
  """
  difference = np.abs(image.astype(np.float32) - aif.astype(np.float32)).mean(-1)
  scales = example_scales(depth, blur, difference)
  valid = depth > 0
  panels = [image, aif, scales[PANELS[2]].colours(depth, valid),
            scales[PANELS[3]].colours(blur, valid), scales[PANELS[4]].colours(difference)]
  h, w = size
  width = len(panels) * (w + PANEL_GAP) - PANEL_GAP
  row = Image.new('RGB', (width, h + BAR_HEIGHT + 2 * TEXT_HEIGHT), 'white')
  draw = ImageDraw.Draw(row)
  font = ImageFont.load_default()
  boxes = {}
  for name, panel in zip(PANELS, panels):
    left = len(boxes) * (w + PANEL_GAP)
    boxes[name] = (0, left, h, w)
    row.paste(Image.fromarray(panel).resize((w, h), Image.Resampling.NEAREST), (left, 0))
    if scale := scales.get(name):
      bar = scale.colours(np.linspace(scale.vmin, scale.vmax, w)[None].repeat(BAR_HEIGHT, 0))
      row.paste(Image.fromarray(bar), (left, h))
      low, high = _BAR_ENDS.get(name, ('', ''))
      draw.text((left, h + BAR_HEIGHT), f'{scale.vmin:.3g}{low}', fill='black', font=font)
      right = f'{scale.vmax:.3g}{high}'
      draw.text((left + w - draw.textlength(right, font=font), h + BAR_HEIGHT), right,
                fill='black', font=font)
  draw.text((0, h + BAR_HEIGHT + TEXT_HEIGHT), caption, fill='black', font=font)
  return Row(np.asarray(row), boxes, scales)


def stack_rows(rows: Sequence[Row]) -> tuple[np.ndarray, list[int]]:
  """The rows one under another beneath the panel titles: (uint8 image, each row's top)."""
  width = max(row.image.shape[1] for row in rows)
  grid = Image.new('RGB', (width, TEXT_HEIGHT + sum(row.image.shape[0] + PANEL_GAP
                                                    for row in rows)), 'white')
  draw = ImageDraw.Draw(grid)
  for name, (_, left, _, _) in rows[0].boxes.items():
    draw.text((left, 0), name, fill='black', font=ImageFont.load_default())
  tops, top = [], TEXT_HEIGHT
  for row in rows:
    grid.paste(Image.fromarray(row.image), (0, top))
    tops.append(top)
    top += row.image.shape[0] + PANEL_GAP
  return np.asarray(grid), tops


def camera_caption(camera: Mapping[str, float]) -> str:
  """A camera (metres, as ``defocus.Camera`` fields) in the units photographers use."""
  return (f'f = {camera["focal_length"] * 1e3:.3g} mm, f/{camera["f_number"]:.3g}, pixel '
          f'{camera["pixel_size"] * 1e6:.3g} um, focus {camera["focus_distance"]:.3g} m')


def eval_panels(batch: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                num_images: int, min_depth: float) -> dict[str, np.ndarray]:
  """TensorBoard images of an eval batch: each example as the dataset preview shows it (input,
  AiF, depth, blur map, |input - AiF|, the camera), predicted|true depth (one colour scale)
  and predicted|true AiF, side by side."""
  n = num_images
  if not n:
    return {}
  inputs, aifs = images.to_uint8(outputs['input'][:n]), images.to_uint8(batch['aif'][:n])
  rows = [example_row(inputs[i], aifs[i], batch['depth'][i], batch['blur'][i],
                      camera_caption(dict(zip(defocus.CAMERA_FIELDS, batch['camera'][i]))),
                      inputs.shape[1:3]).image for i in range(len(inputs))]
  panels = {'input': inputs, 'examples': np.stack(rows)}
  if 'depth' in outputs:
    lo, hi = min_depth, float(np.max(batch['depth'][:n]))
    panels['depth/predicted_vs_true'] = np.concatenate([
        colorize_depth(outputs['depth'][:n], lo, hi),
        colorize_depth(batch['depth'][:n], lo, hi)], axis=2)
  if 'aif' in outputs:
    panels['aif/predicted_vs_true'] = np.concatenate([
        images.to_uint8(outputs['aif'][:n]), images.to_uint8(batch['aif'][:n])], axis=2)
  return panels
