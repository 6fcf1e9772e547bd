"""Image value ranges, one definition each: uint8 files, the network's [-1, 1], and [0, 1] for
metrics and display. The network sees uint8 / 127.5 - 1 (no mean/std), as the authors trained."""

import numpy as np


def to_network_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(image, np.float32) / 127.5 - 1.0


def to_unit_range(image):
  """[-1, 1] -> [0, 1], unclipped; numpy or jax arrays alike."""
  return (image + 1) / 2


def to_uint8(image) -> np.ndarray:
  """[-1, 1] -> uint8, clipped and rounded."""
  return np.round(np.clip(to_unit_range(np.asarray(image, np.float32)), 0, 1) * 255).astype(
      np.uint8)
