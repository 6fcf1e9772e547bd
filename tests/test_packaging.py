"""What pip installs from setup.cfg (the metadata of the installed package)."""

import importlib.metadata


def test_accelerator_extras_install_jaxs_own_wheels():
  """`pip install -e '.[cuda13]'` on a GPU VM, `'.[tpu]'` on a TPU VM (README.md): without them
  pip installs the CPU jaxlib alone, and JAX computes on the CPU."""
  requires = importlib.metadata.requires('hded-jax')
  for extra in ('cuda13', 'cuda12', 'tpu'):
    assert f'jax[{extra}]; extra == "{extra}"' in requires, requires
