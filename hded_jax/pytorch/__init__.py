"""The PyTorch original: its weights in hded-jax's layout (`weights`, numpy only) and a PyTorch
re-implementation with the official module names (`reference`, needs the `torch` extra)."""
