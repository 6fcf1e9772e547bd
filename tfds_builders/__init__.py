"""TFDS builders for defocus datasets; `registry` lists them and registers them with TFDS."""

from tfds_builders import registry  # pylint: disable=unused-import
