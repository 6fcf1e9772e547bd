"""TFDS builders for defocus datasets; importing this package registers all of them."""

from tfds_builders import make3d_defocus
from tfds_builders import nyu_depth_v2_defocus
from tfds_builders import synthetic_defocus
