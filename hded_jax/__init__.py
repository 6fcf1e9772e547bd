"""hded-jax: 2HDED:NET (joint depth estimation and deblurring from one defocused image) in JAX."""
