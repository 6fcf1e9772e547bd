"""What a training run's state is: training updates it, checkpoints save and restore it."""

import flax
import jax
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  batch_stats: nnx.State
  opt_state: optax.OptState
