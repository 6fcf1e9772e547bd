"""The 2HDED:NET model (Flax NNX)."""

from hded_jax.models.hded_net import (HDEDNet, abstract_model, count_params, create_model,
                                      matmul_precision, model_config, parameter_table, split_model)

__all__ = ['HDEDNet', 'abstract_model', 'count_params', 'create_model', 'matmul_precision',
           'model_config', 'parameter_table', 'split_model']
