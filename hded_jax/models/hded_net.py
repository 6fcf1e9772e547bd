"""2HDED:NET: one DenseNet encoder, a depth decoder and an all-in-focus (AiF) decoder."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from hded_jax import defocus
from hded_jax.models import layers
from hded_jax.models.decoder import Decoder
from hded_jax.models.densenet import DenseNetEncoder

HEADS = ('depth', 'aif')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# How float32 convolutions and matrix products compute, by JAX's names
# (`jax.default_matmul_precision`): 'default' is each backend's own (float32 on CPUs, TF32 on
# NVIDIA GPUs from Ampere on, one bfloat16 pass on TPUs), 'float32' full float32 everywhere.
MATMUL_PRECISIONS = ('default', 'tensorfloat32', 'float32')
# The encoder halves the resolution five times.
INPUT_MULTIPLE = 32
# With model.camera_input, input channels beyond RGB (`camera_channels`).
CAMERA_CHANNELS = 2


def model_config(variant: str = 'densenet121') -> ml_collections.ConfigDict:
  """Architecture presets: the paper's network; 'small' for CPU runs on the synthetic data;
  'tiny' for tests."""
  if variant == 'densenet121':
    arch = dict(block_sizes=(6, 12, 24, 16), growth_rate=32, num_init_features=64, bn_size=4)
  elif variant == 'small':
    arch = dict(block_sizes=(2, 3, 4, 3), growth_rate=16, num_init_features=32, bn_size=4)
  elif variant == 'tiny':
    arch = dict(block_sizes=(1, 1, 1, 1), growth_rate=8, num_init_features=16, bn_size=2)
  else:
    raise ValueError(f'Unknown model variant {variant!r}; use "densenet121", "small" or "tiny".')
  return ml_collections.ConfigDict(dict(
      **arch,
      dropout_rate=0.5,
      # ('depth', 'aif') is 2HDED:NET; ('depth',) is the single-head D3-Net baseline.
      heads=HEADS,
      # Some released models squash the AiF output with tanh; the paper's is linear.
      aif_tanh=False,
      # Metres per unit of the depth head's raw output (1.0 for models trained here; imported
      # models trained on other depth units set it so that predictions come out in metres).
      depth_scale=1.0,
      # Compute dtype; parameters and BatchNorm statistics always stay float32.
      dtype='float32',
      # The precision of the float32 convolutions and matrix products, gradients included
      # (MATMUL_PRECISIONS): 'default' leaves it to the backend, which on GPUs and TPUs is less
      # than float32 (docs/model.md); 'float32' computes as the CPU and PyTorch with TF32 off.
      matmul_precision='default',
      # Recompute each dense layer's and decoder block's activations in the backward pass:
      # less memory per image (larger batches fit), more compute (docs/performance.md).
      remat=False,
      # Feed the camera to the network as constant input channels (`camera_channels`): with
      # cameras that vary (config.dataset.camera ranges) the same blur means other depths.
      camera_input=False,
      # What remat keeps: 'nothing' or 'conv_outputs' (layers.REMAT_POLICIES).
      remat_policy='nothing',
      # 'unrolled' or 'scan': each dense block as one scanned layer, compiled once per block
      # instead of once per layer (faster compile; docs/performance.md).
      dense_block='unrolled',
      # How the same function is computed (layers.formulations), chosen when the model is built
      # for the platform it runs on. The decoders' up-convolutions: 'auto' (four phase
      # convolutions on CPU and GPU, one conv_transpose on TPU), 'phases', 'phase_channels'
      # (the four phases as one convolution's output channels), 'transpose' or
      # 'transpose_strided_grads' (layers.UP_CONVS).
      up_conv='auto',
      # The convolutions' gradients: 'auto' (XLA's own on GPU and TPU; on CPU, as measured,
      # NHWC convolutions moving the fewer channels for stride-1 ones, up-convolutions' phases
      # included, a stride-1 conv's over the space-to-depth input for the stem's stride-2 4x4,
      # matrix products for an up-conv with more input channels than positions), 'xla' or
      # 'nhwc' (layers.conv_with_nhwc_gradients).
      conv_gradients='auto',
      # The 1x1 convolutions (dense layers, transitions): 'auto' (matrix products on GPUs, which
      # XLA compiles faster than cuDNN convolutions; convolutions elsewhere), 'conv' or 'dot'.
      pointwise_convs='auto',
  ))


def check_config(config: ml_collections.ConfigDict, platform: str) -> None:
  """Stops on values the network cannot have, naming the field: called before building it
  (under ``jax.eval_shape`` the error would end on JAX's note about the frames it hides)."""
  sizes = [*config.block_sizes, config.growth_rate, config.num_init_features, config.bn_size]
  if not config.block_sizes or min(sizes) < 1:
    raise ValueError(f'model.block_sizes={tuple(config.block_sizes)}, growth_rate='
                     f'{config.growth_rate}, num_init_features={config.num_init_features}, '
                     f'bn_size={config.bn_size}: each must be at least 1.')
  heads = tuple(config.heads)
  if not heads or set(heads) - set(HEADS) or len(set(heads)) != len(heads):
    raise ValueError(f'model.heads={heads!r}: choose "depth" and/or "aif" from {HEADS}.')
  if config.dtype not in DTYPES:
    raise ValueError(f'model.dtype={config.dtype!r}: choose one of {sorted(DTYPES)}.')
  matmul_precision(config)
  layers.remat_policy(_remat(config))
  layers.formulations(config, platform)


def _remat(config: ml_collections.ConfigDict) -> str | None:
  # Configs saved in checkpoints from before the options have no 'remat' or 'remat_policy'.
  return config.get('remat_policy', 'nothing') if config.get('remat', False) else None


class HDEDNet(nnx.Module):
  """Maps a defocused image in [-1, 1] (NHWC) to {'depth': (N,H,W), 'aif': (N,H,W,3)}."""

  def __init__(self, config: ml_collections.ConfigDict, *, platform: str, rngs: nnx.Rngs):
    """``platform``: where the model will run ('cpu', 'gpu', 'tpu', or a ``jax.export``
    platform such as 'cuda'), which decides what the 'auto' options compute with."""
    check_config(config, platform)
    heads = tuple(config.heads)
    dtype = DTYPES[config.dtype]
    self.matmul_precision = matmul_precision(config)
    remat = _remat(config)
    formulations = layers.formulations(config, platform)
    self.heads = heads
    self.aif_tanh = bool(config.aif_tanh)
    self.depth_scale = float(config.depth_scale)
    # Configs saved in checkpoints from before the option have no 'camera_input'.
    self.camera_input = bool(config.get('camera_input', False))
    self.encoder = DenseNetEncoder(
        in_features=3 + (CAMERA_CHANNELS if self.camera_input else 0),
        block_sizes=tuple(config.block_sizes), growth_rate=config.growth_rate,
        num_init_features=config.num_init_features, bn_size=config.bn_size,
        dense_block=config.get('dense_block', 'unrolled'), remat=remat,
        formulations=formulations, dtype=dtype, rngs=rngs)
    decoder_args = dict(bottleneck_features=self.encoder.out_features,
                        skip_features=self.encoder.skip_features,
                        dropout_rate=config.dropout_rate,
                        formulations=formulations, remat=remat,
                        dtype=dtype, rngs=rngs)
    self.depth_decoder = (Decoder(out_channels=1, **decoder_args) if 'depth' in heads
                          else None)
    self.aif_decoder = Decoder(out_channels=3, **decoder_args) if 'aif' in heads else None

  def __call__(self, image: jax.Array, *, camera: jax.Array | None = None,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """``camera``: (N, 4) in ``defocus.CAMERA_FIELDS`` order, read with ``camera_input`` only.
    ``rngs`` (a ``dropout`` stream) is needed in training mode only."""
    with jax.default_matmul_precision(self.matmul_precision):
      return self._forward(image, camera, rngs)

  def _forward(self, image, camera, rngs) -> dict[str, jax.Array]:
    check_input_shape(image.shape)
    x = image
    if self.camera_input:
      if camera is None:
        raise ValueError('This model takes the camera as input (model.camera_input=True): pass '
                         'camera=(N, 4) focal length, f-number, pixel size, focus distance.')
      x = jnp.concatenate([image, camera_channels(camera, image.shape).astype(image.dtype)], -1)
    bottleneck, skips = self.encoder(x)
    outputs = {}
    if self.depth_decoder is not None:
      depth = self.depth_decoder(bottleneck, skips, rngs)[..., 0].astype(jnp.float32)
      outputs['depth'] = depth * self.depth_scale if self.depth_scale != 1.0 else depth
    if self.aif_decoder is not None:
      # The AiF head predicts a residual onto the (defocused) input.
      aif = (self.aif_decoder(bottleneck, skips, rngs).astype(jnp.float32)
             + image.astype(jnp.float32))
      outputs['aif'] = jnp.tanh(aif) if self.aif_tanh else aif
    return outputs


def matmul_precision(config: ml_collections.ConfigDict) -> str:
  """``config``'s (a model config's) ``matmul_precision``, checked. Programs that differentiate
  the model trace its gradients inside ``jax.default_matmul_precision`` of it too (the layers'
  custom gradients are traced after the model's call has returned)."""
  # Configs saved in checkpoints from before the option have no 'matmul_precision'.
  precision = config.get('matmul_precision', 'default')
  if precision not in MATMUL_PRECISIONS:
    raise ValueError(f'model.matmul_precision={precision!r}: choose one of '
                     f'{", ".join(MATMUL_PRECISIONS)}.')
  return precision


def camera_channels(camera: jax.Array, shape) -> jax.Array:
  """(N, H, W, CAMERA_CHANNELS) constant planes: the blur per dioptre of defocus
  (``defocus.blur_scale_px``, in the camera's pixels) and the focus in dioptres, from which
  sigma = scale · |1/focus - 1/depth| gives depth on either side of the focal plane."""
  camera = defocus.Camera(*jnp.moveaxis(jnp.asarray(camera, jnp.float32), -1, 0))
  values = jnp.stack([defocus.blur_scale_px(camera), 1 / camera.focus_distance], -1)
  return jnp.broadcast_to(values[:, None, None, :], (*shape[:3], CAMERA_CHANNELS))


def check_input_shape(shape) -> None:
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'Expected a batch of RGB images (N, H, W, 3), got shape {tuple(shape)}.')
  h, w = shape[1:3]
  if h % INPUT_MULTIPLE or w % INPUT_MULTIPLE:
    raise ValueError(
        f'Image size {h}x{w} is not a multiple of {INPUT_MULTIPLE} in both H and W; resize, '
        f'crop or pad it (e.g. to {-(-h // INPUT_MULTIPLE) * INPUT_MULTIPLE}x'
        f'{-(-w // INPUT_MULTIPLE) * INPUT_MULTIPLE}).')


def abstract_model(config: ml_collections.ConfigDict, platform: str | None = None) -> HDEDNet:
  """The network with shapes and dtypes but no values: a restore target, or for counting."""
  platform = platform or jax.default_backend()
  check_config(config, platform)

  def build():
    rngs = nnx.Rngs(0)
    # Only shapes come out, so the keys need no values and the draw counter can be a host
    # array. Flax's own is an array updated in place, a tracer under eval_shape, and each
    # update asks it for its sharding: JAX's error for a tracer walks the program traced so
    # far, most of the time this took for the full model.
    rngs.default.count.value = np.zeros((), np.uint32)
    return HDEDNet(config, platform=platform, rngs=rngs)

  return nnx.eval_shape(build)


def create_model(config: ml_collections.ConfigDict, seed: int = 0,
                 platform: str | None = None) -> HDEDNet:
  """The network for ``platform`` (default: JAX's default backend), see ``HDEDNet``."""
  return HDEDNet(config, platform=platform or jax.default_backend(), rngs=nnx.Rngs(seed))


def split_model(model: nnx.Module):
  """(train graphdef, eval graphdef, params, batch_stats): the mode lives in the graphdef."""
  model.train()
  train_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_graphdef = nnx.graphdef(model)
  return train_graphdef, eval_graphdef, params, batch_stats


def count_params(config: ml_collections.ConfigDict) -> int:
  """Trainable parameter count, without allocating any array."""
  return sum(count for _, count in parameter_table(config, depth=0))


def parameter_table(config: ml_collections.ConfigDict, depth: int = 2) -> list[tuple[str, int]]:
  """[(module path, parameter count)] sorted by path, grouped ``depth`` levels deep."""
  counts = {}
  params = nnx.state(abstract_model(config), nnx.Param).to_pure_dict()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
    name = '.'.join(keys[:min(depth, len(keys) - 1)])
    counts[name] = counts.get(name, 0) + leaf.size
  return list(counts.items())
