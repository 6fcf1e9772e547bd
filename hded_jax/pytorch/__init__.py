"""The PyTorch original: its weights in hded-jax's layout (`weights`, numpy only) and a PyTorch
re-implementation with the official module names (`reference`, needs the `torch` extra); and
`load_triton_first`, for processes that run torch beside TensorFlow."""

import importlib.util
import sys

from absl import logging


def load_triton_first() -> None:
  """Imports Triton where it is installed (pip's CUDA builds of torch bring it), before anything
  imports TensorFlow: imported after TensorFlow, Triton crashes the process (SIGSEGV; TensorFlow
  2.21, Triton 3.7.1), and torch imports it at its first optimizer. Where TensorFlow came first,
  says so instead."""
  if 'triton' in sys.modules or importlib.util.find_spec('triton') is None:
    return
  if 'tensorflow' in sys.modules:
    logging.warning('TensorFlow was imported before Triton: torch\'s first optimizer may crash '
                    'this process (it imports Triton). Call hded_jax.pytorch.load_triton_first() '
                    'before anything imports TensorFlow.')
    return
  import triton  # pylint: disable=g-import-not-at-top,unused-import
