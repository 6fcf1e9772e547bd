"""2HDED:NET on NYU Depth v2 (labeled 795/654 split, D3-Net defocus, focus 2 m)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset.name = 'nyu_depth_v2_defocus'
  config.dataset.builder_config = 'focus_2m'
  config.dataset.min_depth = 1e-3
  config.dataset.eval_protocol = 'nyu_literature'
  config.dataset.max_depth = 10.0
  return config
