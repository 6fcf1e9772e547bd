"""2HDED:NET on Make3D (400/134 split, depths evaluated below 70 m)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'make3d_defocus'
  config.dataset.min_depth = 1e-3
  config.dataset.eval_protocol = 'make3d_literature'
  config.dataset.max_depth = 70.0
  return config
