"""Registers the `nyu_depth_v2_defocus` TFDS builder."""

from tfds_builders.nyu_depth_v2_defocus.nyu_depth_v2_defocus_dataset_builder import Builder
