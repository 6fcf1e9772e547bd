"""Registers the `make3d_defocus` TFDS builder."""

from tfds_builders.make3d_defocus.make3d_defocus_dataset_builder import Builder
