"""The parts of the benchmark (`hded_jax.benchmark_lib` runs them; `python -m
hded_jax.benchmark` is the command): measuring on this machine, compiling for devices it lacks,
the largest batch, the PyTorch reference, profiler traces and the text table."""
