"""The 2HDED:NET model (Flax NNX)."""

from hded_jax.models.hded_net import HDEDNet, count_params, create_model, model_config

__all__ = ['HDEDNet', 'count_params', 'create_model', 'model_config']
