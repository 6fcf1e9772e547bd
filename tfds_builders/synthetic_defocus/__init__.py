"""Procedural defocus scenes, no download: ``import tfds_builders.synthetic_defocus``."""

from tfds_builders.synthetic_defocus.synthetic_defocus_dataset_builder import (
    DEPTH_RANGE, Builder, SyntheticDefocusConfig, composite, generate_scene, room_scene)

__all__ = ['DEPTH_RANGE', 'Builder', 'SyntheticDefocusConfig', 'composite', 'generate_scene',
           'room_scene']
