"""Image value ranges, one definition each: uint8 files, the network's [-1, 1], and [0, 1] for
metrics and display. The network sees uint8 / 127.5 - 1 (no mean/std), as the authors trained.

Image files are read here as the network needs them: 8-bit RGB, upright as a viewer shows them.
"""

import numpy as np
from PIL import ExifTags
from PIL import Image
from PIL import ImageOps

# PIL modes of 16-bit grayscale (PNG, TIFF): white is 65535.
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
# EXIF orientations that turn the stored image by 90 degrees (phone photos held upright).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def to_network_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(image, np.float32) / 127.5 - 1.0


def to_unit_range(image):
  """[-1, 1] -> [0, 1], unclipped; numpy or jax arrays alike."""
  return (image + 1) / 2


def to_clipped_unit_range(image):
  """[-1, 1] -> [0, 1], clipped (a network output shown or scored as an image); numpy or jax
  arrays alike."""
  return to_unit_range(image).clip(0, 1)


def from_unit_range(image):
  """[0, 1] -> [-1, 1]; numpy or jax arrays alike."""
  return image * 2 - 1


def unit_to_uint8(image) -> np.ndarray:
  """[0, 1] -> uint8, clipped and rounded (in the input's precision)."""
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def to_uint8(image) -> np.ndarray:
  """[-1, 1] -> uint8, clipped and rounded."""
  return unit_to_uint8(to_unit_range(np.asarray(image, np.float32)))


def resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
  """uint8 (H, W) or (H, W, 3), or float32 (H, W), resized by PIL to size = (h, w), unless it
  has that size: the input pipeline's resize, shared with Make3D's depth (which the pipeline
  must resize as the builder did) and predictions resized back to their photo's size."""
  if array.shape[:2] == tuple(size):
    return array
  h, w = size
  return np.asarray(Image.fromarray(array).resize((w, h), resample))


def read_rgb(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
  """An image file as uint8 (H, W, 3), turned as its EXIF orientation says, optionally resized
  (bilinear) to size = (h, w).

  8-bit files of any mode convert as PIL converts them; 16-bit grayscale scales 65535 to 255;
  float images ('F', e.g. TIFF) must lie in [0, 1]. 32-bit integer images have no white level
  and are refused (ValueError), like modes PIL cannot convert to RGB.
  """
  with Image.open(path) as image:
    image = _to_rgb(ImageOps.exif_transpose(image), path)
  if size is not None and image.size != size[::-1]:
    image = image.resize(size[::-1], Image.Resampling.BILINEAR)
  return np.asarray(image)


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
  if image.mode in _SIXTEEN_BIT_MODES:
    gray = np.asarray(image).astype(np.float32) * (255 / 65535)
    return Image.fromarray(np.round(gray).astype(np.uint8)).convert('RGB')
  if image.mode == 'F':
    values = np.asarray(image)
    if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
      raise ValueError(
          f'{path}: a float image with values in [{np.nanmin(values):.4g}, '
          f'{np.nanmax(values):.4g}]; only [0, 1] says where white is. Scale it to [0, 1] or '
          'save it as an 8-bit image.')
    return Image.fromarray(unit_to_uint8(values)).convert('RGB')
  if image.mode == 'I':
    raise ValueError(f'{path}: 32-bit integer pixels (PIL mode I) have no white level; save it '
                     'as an 8- or 16-bit image.')
  return image.convert('RGB')


def image_size(path: str) -> tuple[int, int]:
  """(H, W) as shown (EXIF orientation applied), from the file header without decoding."""
  with Image.open(path) as image:
    w, h = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation)
  return (w, h) if orientation in _TRANSPOSED_ORIENTATIONS else (h, w)
