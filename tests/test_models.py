"""The 2HDED:NET model: architecture facts from the paper (docs/model.md), padding, init and
train/eval modes."""

import functools
import os
import re
import subprocess
import sys
import traceback

import jax
from jax._src import core as jax_core  # Tracer.sharding, to count who asks it.
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hded_jax import defocus
from hded_jax import models
from hded_jax.models import layers
from tests.conftest import REPO
from tests.conftest import forced_devices_xla_flags


@nnx.jit
def forward(model, image, rngs=None):
  """Jitted: op-by-op (eager) calls compile every op separately, slow on a small CPU."""
  return model(image, rngs=rngs)


def test_full_size_parameter_counts_match_the_paper():
  assert dict(models.parameter_table(models.model_config('densenet121'), depth=1)) == {
      'encoder': 7_011_840, 'depth_decoder': 17_200_704, 'aif_decoder': 17_201_856}
  assert 'encoder.denseblocks' in dict(models.parameter_table(models.model_config('densenet121')))
  config = models.model_config('densenet121')
  config.heads = ('depth',)
  assert models.count_params(config) == 24_212_544


def test_camera_input_adds_the_camera_planes_to_the_first_conv_only():
  config = models.model_config('densenet121')
  config.camera_input = True
  # conv0 (3x3, no bias, 64 filters) reads 2 more channels; nothing else changes.
  assert models.count_params(config) == 41_414_400 + 2 * 3 * 3 * 64
  tiny_config = models.model_config('tiny')
  tiny_config.camera_input = True
  model = models.create_model(tiny_config)
  model.eval()
  image = jnp.zeros((2, 32, 32, 3))
  with pytest.raises(ValueError, match='takes the camera as input'):
    model(image)
  nyu = np.array([0.015, 2.8, 5.6e-6, 2.0], np.float32)
  far = nyu.copy()
  far[3] = 4.0
  camera = jnp.asarray(np.stack([nyu, far]))
  planes = models.hded_net.camera_channels(camera, image.shape)
  assert planes.shape == (2, 32, 32, 2)
  np.testing.assert_allclose(planes[:, 0, 0, 1], [0.5, 0.25])
  np.testing.assert_allclose(planes[0, 5, 7, 0], defocus.blur_scale_px(defocus.CAMERAS['nyu']),
                             rtol=1e-5)
  # The same image with other cameras gives other depths.
  out = nnx.jit(lambda m, x, c: m(x, camera=c))(model, jnp.ones((2, 32, 32, 3)), camera)
  assert not np.allclose(out['depth'][0], out['depth'][1])


def test_full_size_shapes_without_computing():
  def run(image):
    model = models.create_model(models.model_config())
    model.eval()
    return model.encoder(image), model(image)

  (bottleneck, skips), out = jax.eval_shape(run, jnp.zeros((2, 256, 320, 3)))
  assert bottleneck.shape == (2, 8, 10, 1024)
  assert [s.shape for s in skips] == [(2, 128, 160, 64), (2, 64, 80, 128), (2, 32, 40, 256),
                                      (2, 16, 20, 512)]
  assert out['depth'].shape == (2, 256, 320) and out['aif'].shape == (2, 256, 320, 3)


@pytest.fixture(scope='module')
def tiny():
  return models.create_model(models.model_config('tiny'), seed=0)


def test_rejects_sizes_that_are_not_multiples_of_32(tiny):
  tiny.eval()
  with pytest.raises(ValueError, match='not a multiple of 32.*64x96'):
    tiny(jnp.zeros((1, 50, 96, 3)))
  with pytest.raises(ValueError, match=r'\(N, H, W, 3\)'):
    tiny(jnp.zeros((1, 64, 64)))


def test_config_errors():
  config = models.model_config('tiny')
  config.heads = ('depth', 'normals')
  with pytest.raises(ValueError, match='model.heads'):
    models.create_model(config)
  with pytest.raises(ValueError, match='Unknown model variant'):
    models.model_config('resnet')
  config = models.model_config('tiny')
  config.matmul_precision = 'fp32'
  with pytest.raises(ValueError, match="matmul_precision='fp32': choose one of default, "):
    models.create_model(config)


@pytest.mark.parametrize('field, value, message', [
    ('dtype', 'float16', "model.dtype='float16': choose one of"),
    ('growth_rate', -4, 'growth_rate=-4, .*: each must be at least 1'),
    ('block_sizes', (), 'model.block_sizes=()'),
    ('heads', ('depht',), 'model.heads='),
    ('remat', True, None), ('up_conv', 'foo', "model.up_conv='foo'"),
])
def test_abstract_model_names_a_bad_value_before_jax_traces_anything(field, value, message):
  """Raised outside `jax.eval_shape`, so that the message is the last line a user reads, not
  JAX's note about the frames it hides."""
  config = models.model_config('tiny')
  config[field] = value
  if message is None:  # A valid value: the policy checked with it.
    config.remat_policy = 'everything'
    message = "remat_policy='everything'"
  with pytest.raises(ValueError, match=message) as raised:
    models.abstract_model(config)
  assert not any(re.search(r'site-packages/(jax|flax)/', frame.filename)
                 for frame in traceback.extract_tb(raised.tb)), traceback.format_tb(raised.tb)


def test_full_matmul_precision_computes_the_cpus_function():
  """The CPU computes float32 products in float32 anyway: 'float32' gives the same weights and
  outputs as 'default' there (on GPUs and TPUs 'default' computes in less)."""
  config = models.model_config('tiny')
  image = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1.0)
  def outputs():
    model = models.create_model(config)
    model.eval()
    return model(image)

  default = outputs()
  config.matmul_precision = 'float32'
  full = outputs()
  for head in default:
    np.testing.assert_array_equal(full[head], default[head])


def test_aif_head_is_a_residual_onto_the_input(tiny):
  tiny.eval()
  image = jax.random.uniform(jax.random.key(0), (1, 32, 64, 3), minval=-1, maxval=1)
  residual = nnx.jit(lambda m, x: m.aif_decoder(*m.encoder(x)))(tiny, image)
  np.testing.assert_allclose(forward(tiny, image)['aif'], residual + image, atol=1e-6)


def test_upconv_is_pytorchs_transposed_conv():
  """UpConv computes lax.conv_transpose with PyTorch's padding (k=4, s=2, p=1 -> 2x size)."""
  formulations = layers.Formulations(up_conv='transpose', conv_gradients='xla',
                                     pointwise_convs='conv')
  up = layers.UpConv(5, 7, formulations=formulations, dtype=jnp.float32, rngs=nnx.Rngs(0))
  up.bias[...] = jax.random.normal(jax.random.key(2), (7,))
  x = jax.random.normal(jax.random.key(1), (2, 6, 10, 5))
  expected = jax.lax.conv_transpose(x, up.kernel[...], (2, 2), ((2, 2), (2, 2)),
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + up.bias[...]
  np.testing.assert_allclose(up(x), expected, atol=1e-5)
  assert up(x).shape == (2, 12, 20, 7)


def test_phase_upsampling_conv_gradients_are_conv_transposes():
  x = jax.random.normal(jax.random.key(1), (2, 6, 10, 5))
  kernel = jax.random.normal(jax.random.key(2), (4, 4, 5, 7))
  weights = jax.random.normal(jax.random.key(3), (2, 12, 20, 7))
  transpose = functools.partial(jax.lax.conv_transpose, strides=(2, 2), padding=((2, 2), (2, 2)),
                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  grads = [jax.jit(jax.grad(lambda x, k: jnp.sum(weights * jnp.sin(f(x, k))), (0, 1)))(x, kernel)
           for f in (layers.UP_CONVS['phases'], transpose)]
  for ours, expected in zip(*grads):
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gradients', sorted(layers.CONV_GRADIENTS))
def test_stride_two_convs_pad_like_pytorch(gradients):
  """PyTorch pads 1 on every side; XLA's SAME would pad (0, 1) and shift the output."""
  formulations = layers.Formulations(up_conv='transpose', conv_gradients=gradients,
                                     pointwise_convs='dot')  # Not a 1x1 conv: no matrix product.
  conv = layers.conv(1, 1, 3, stride=2, padding=1, formulations=formulations,
                     dtype=jnp.float32, rngs=nnx.Rngs(0))
  conv.kernel[...] = jnp.zeros((3, 3, 1, 1)).at[0, 0, 0, 0].set(1.0)  # picks the top-left tap
  x = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
  # Output (i, j) reads input (2i - 1, 2j - 1): zero padding for i or j = 0.
  np.testing.assert_array_equal(conv(x)[0, ..., 0], [[0, 0], [0, 6]])


def test_pointwise_conv_as_dot_computes_only_pointwise_convs():
  x = jax.random.normal(jax.random.key(1), (2, 5, 6, 4))
  kernel = jax.random.normal(jax.random.key(2), (1, 1, 4, 3))
  nhwc = ('NHWC', 'HWIO', 'NHWC')
  np.testing.assert_allclose(
      layers.pointwise_conv_as_dot(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=nhwc),
      jax.lax.conv_general_dilated(x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=nhwc),
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='1x1, stride-1, unpadded NHWC'):
    layers.pointwise_conv_as_dot(x, kernel, (2, 2), ((0, 0), (0, 0)), dimension_numbers=nhwc)


def test_init_follows_the_authors():
  model = models.create_model(models.model_config('densenet121'), seed=3)
  kernels = np.asarray(model.encoder.denseblocks[2].layers[5].conv2.kernel[...])
  assert abs(kernels.mean()) < 1e-3 and kernels.std() == pytest.approx(0.02, rel=0.02)
  scale = np.asarray(model.depth_decoder.blocks[0].bn1.scale[...])
  assert scale.mean() == pytest.approx(1.0, abs=0.005) and scale.std() == pytest.approx(
      0.02, rel=0.15)
  np.testing.assert_array_equal(model.encoder.norm5.bias[...], 0.0)
  np.testing.assert_array_equal(model.encoder.norm5.mean[...], 0.0)
  np.testing.assert_array_equal(model.encoder.norm5.var[...], 1.0)


def test_abstract_model_has_the_models_layout_and_asks_no_tracer_for_its_sharding(monkeypatch):
  """The layout a resumed run restores into: the created model's structure, shapes and dtypes,
  built without asking a tracer for its sharding (JAX's error for that walks the program traced
  so far: 1.4 of 1.8 s for the full model)."""
  asked = []
  sharding = jax_core.Tracer.sharding
  monkeypatch.setattr(jax_core.Tracer, 'sharding',
                      property(lambda tracer: asked.append(tracer) or sharding.fget(tracer)))
  config = models.model_config('tiny')
  abstract = nnx.state(models.abstract_model(config))
  assert not asked
  created = nnx.state(models.create_model(config))
  assert jax.tree.structure(abstract) == jax.tree.structure(created)
  assert ([(x.shape, x.dtype) for x in jax.tree.leaves(abstract)] ==
          [(x.shape, x.dtype) for x in jax.tree.leaves(created)])


def test_initial_weights_are_the_same_eagerly_under_jit_and_scanned():
  """Drawn on the host: one set of initial weights whichever path creates the model."""
  config = models.model_config('tiny')
  eager = nnx.state(models.create_model(config, seed=1)).to_pure_dict()
  jitted = jax.jit(lambda: nnx.state(models.create_model(config, seed=1)).to_pure_dict())()
  config.dense_block = 'scan'
  scanned = nnx.state(models.create_model(config, seed=1)).to_pure_dict()
  jax.tree.map(np.testing.assert_array_equal, jitted, eager)
  jax.tree.map(np.testing.assert_array_equal, scanned, eager)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_is_flaxs(dtype):
  """Same initial weights, outputs and running statistics as ``nnx.BatchNorm`` bit for bit, in
  train and eval mode, the same random stream for the layers that follow, and the same
  gradients (parameters and input) up to rounding: ours are the closed form."""
  ours = layers.BatchNorm(16, dtype=dtype, rngs=nnx.Rngs(3))
  flax = nnx.BatchNorm(16, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON,
                       scale_init=layers.bn_scale_init, dtype=dtype, rngs=nnx.Rngs(3))

  def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(leaf_a, np.float32),
                                    np.asarray(leaf_b, np.float32))

  assert_same(nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(flax)))
  x = (jax.random.normal(jax.random.key(0), (4, 8, 8, 16)) * 3 + 1).astype(dtype)

  @nnx.jit
  def step(module, x):
    def loss(module, x):
      y = module(x)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, x)
    return y, grads

  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for mode in ('train', 'eval'):
    results = []
    for module in (ours, flax):
      getattr(module, mode)()
      y, (param_grads, x_grad) = step(module, x)
      results.append((y, nnx.to_pure_dict(nnx.state(module)),
                      (nnx.to_pure_dict(param_grads), x_grad)))
    assert results[0][0].dtype == results[0][2][1].dtype == dtype
    assert_same(results[0][:2], results[1][:2])
    for a, b in zip(*(jax.tree.leaves(r[2]) for r in results)):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max())
  ours_rngs, flax_rngs = nnx.Rngs(3), nnx.Rngs(3)
  layers.BatchNorm(16, dtype=dtype, rngs=ours_rngs)
  nnx.BatchNorm(16, rngs=flax_rngs)
  assert jnp.array_equal(jax.random.key_data(ours_rngs.params()),
                         jax.random.key_data(flax_rngs.params()))


def test_train_mode_uses_batch_statistics_and_dropout(tiny):
  image = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  model = nnx.clone(tiny)
  model.train()
  mean_before = np.asarray(model.encoder.norm0.mean[...])
  a = forward(model, image, nnx.Rngs(dropout=1))['depth']
  assert not np.allclose(model.encoder.norm0.mean[...], mean_before)  # running average moved
  b = forward(model, image, nnx.Rngs(dropout=2))['depth']
  assert not np.allclose(a, b)  # different dropout masks
  # Batch statistics: an example's output depends on the rest of the batch.
  c = forward(model, image[:2], nnx.Rngs(dropout=1))['depth']
  assert not np.allclose(a[:2], c)


def test_eval_mode_is_deterministic_and_per_example(tiny):
  image = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
  model = nnx.clone(tiny)
  model.eval()
  mean_before = np.asarray(model.encoder.norm0.mean[...])
  a = forward(model, image)['depth']
  np.testing.assert_array_equal(a, forward(model, image)['depth'])
  np.testing.assert_allclose(a[:2], forward(model, image[:2])['depth'], atol=1e-5)
  np.testing.assert_array_equal(model.encoder.norm0.mean[...], mean_before)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  config = models.model_config('tiny')
  f32 = models.create_model(config, seed=0)
  config.dtype = 'bfloat16'
  bf16 = models.create_model(config, seed=0)
  for leaf in jax.tree.leaves(nnx.state(bf16)):
    assert leaf.dtype == jnp.float32
  f32.eval()
  bf16.eval()
  image = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  out32, out16 = forward(f32, image), forward(bf16, image)
  for key in ('depth', 'aif'):
    assert out16[key].dtype == jnp.float32
    np.testing.assert_allclose(out16[key], out32[key], atol=0.1)


def test_depth_only_model_and_depth_scale():
  config = models.model_config('tiny')
  config.heads = ('depth',)
  model = models.create_model(config, seed=0)
  model.eval()
  image = jnp.zeros((1, 32, 32, 3))
  out = forward(model, image)
  assert set(out) == {'depth'}
  config.depth_scale = 10.0
  scaled = models.create_model(config, seed=0)
  scaled.eval()
  np.testing.assert_allclose(forward(scaled, image)['depth'], 10 * out['depth'], rtol=1e-5)


def test_remat_gives_the_same_gradients_and_batch_statistics():
  """Training mode, dropout included: recomputation replays the same masks."""
  image = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

  def grads_and_stats(remat):
    config = models.model_config('tiny')
    config.remat = remat
    graphdef, params, rest = nnx.split(models.create_model(config), nnx.Param, ...)

    @jax.jit
    def run(params, rest):
      def loss(params):
        model = nnx.merge(graphdef, params, rest, copy=True)
        out = model(image, rngs=nnx.Rngs(dropout=0))
        value = jnp.sum(jnp.sin(out['depth'])) + jnp.sum(jnp.sin(out['aif']))
        return value, nnx.state(model, nnx.BatchStat)
      return jax.grad(loss, has_aux=True)(params)

    return jax.tree.map(np.asarray, run(params, rest))

  plain, remat = grads_and_stats(False), grads_and_stats(True)
  leaves, remat_leaves = jax.tree.leaves(plain), jax.tree.leaves(remat)
  assert len(leaves) == len(remat_leaves) > 50
  for a, b in zip(leaves, remat_leaves):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))


def test_remat_keeps_fewer_activations_for_the_backward_pass():
  """What remat promises on every backend: the forward pass saves far less for the backward
  one (full model, batch 4, 256x256: 3169 -> 774 MiB). How much of that a compiled step's peak
  shows is up to the backend's scheduler: XLA's CPU one shows none (docs/performance.md)."""
  image = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

  def saved_bytes(remat):
    config = models.model_config('tiny')
    config.remat = remat
    graphdef, params, rest = nnx.split(models.create_model(config), nnx.Param, ...)

    def loss(params, rest, image):
      out = nnx.merge(graphdef, params, rest, copy=True)(image, rngs=nnx.Rngs(dropout=0))
      return jnp.sum(out['depth']) + jnp.sum(out['aif'])

    def backward(params, rest, image):  # The VJP function's leaves are the saved residuals.
      return jax.vjp(lambda params: loss(params, rest, image), params)[1]

    residuals = jax.tree.leaves(jax.eval_shape(backward, params, rest, image))
    return sum(np.prod(r.shape) * r.dtype.itemsize for r in residuals)

  assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_summary_command_prints_the_table():
  # As a user runs it: without the skip of CUDA's check that the tests set (`conftest.py`), which
  # a CUDA plugin without CUDA's libraries (the test extra's) fails with a traceback.
  env = {k: v for k, v in os.environ.items() if k != 'JAX_SKIP_CUDA_CONSTRAINTS_CHECK'}
  run = subprocess.run([sys.executable, '-m', 'hded_jax.summary', '--config=configs/nyu.py'],
                       cwd=REPO, capture_output=True, text=True, check=True, env=env)
  assert run.stdout.splitlines()[-1] == 'total parameters: 41414400'
  assert 'encoder.denseblocks' in run.stdout
  assert 'Traceback' not in run.stderr, run.stderr


def _outputs_grads_and_stats(config, image, *, train, part=None, platform=None):
  """Outputs, gradients (parameters and input) and BatchNorm statistics of the model or of one
  of its parts (``part='encoder'``), dropout included in training mode; the model built for
  ``platform`` (default: this one)."""
  model = models.create_model(config, platform=platform)
  model.train() if train else model.eval()
  graphdef, params, rest = nnx.split(getattr(model, part) if part else model, nnx.Param, ...)

  @jax.jit
  def run(params, rest, image):
    def loss(params, image):
      module = nnx.merge(graphdef, params, rest, copy=True)
      outputs = module(image) if part else module(image, rngs=nnx.Rngs(dropout=0))
      value = sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(outputs))
      return value, (outputs, nnx.state(module, nnx.BatchStat))
    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, image)

  return jax.tree.map(np.asarray, run(params, rest, image))


def _assert_trees_close(actual, expected):
  """Equal up to float32 summation order. Gradients of BatchNorm scales in training mode are
  sums that nearly cancel (the stem's: ~1e-3 from terms ~1), hence the absolute tolerance."""
  actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected)
  assert len(actual) == len(expected) > 50
  for a, b in zip(actual, expected):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(b).max())))


def test_models_built_for_cpu_and_for_accelerators_compute_the_same_function():
  """Same initial weights, outputs and gradients (all run here) whichever platform's
  formulations the model is built with (a GPU's: the 1x1 convolutions as matrix products). In
  eval mode: the tiny model's training-mode gradients move by 6% when the image moves by 1e-7,
  too ill-conditioned to compare."""
  config = models.model_config('tiny')
  weights = {platform: nnx.state(models.create_model(config, platform=platform)).to_pure_dict()
             for platform in ('cpu', 'gpu', 'tpu')}
  image = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
  expected = _outputs_grads_and_stats(config, image, train=False, platform='cpu')
  for platform in ('gpu', 'tpu'):
    jax.tree.map(np.testing.assert_array_equal, weights[platform], weights['cpu'])
    _assert_trees_close(_outputs_grads_and_stats(config, image, train=False, platform=platform),
                        expected)


@pytest.mark.parametrize('train, remat', [(True, False), (False, False), (True, True)])
def test_scanned_dense_blocks_compute_the_unrolled_function(train, remat):
  """Same outputs, gradients and BatchNorm statistics. (At least 16 values per channel in the
  last block's batch statistics: with fewer, training-mode gradients are ill-conditioned and
  differ in the third digit from summation order alone.)"""
  image = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (4, 64, 64, 3)), jnp.float32)
  results = {}
  for mode in ('unrolled', 'scan'):
    config = models.model_config('tiny')
    config.block_sizes, config.dense_block, config.remat = (3, 2, 2, 2), mode, remat
    results[mode] = _outputs_grads_and_stats(config, image, train=train, part='encoder')
  _assert_trees_close(results['scan'], results['unrolled'])


def test_scanned_dense_blocks_keep_the_parameter_tree():
  """Checkpoints and the PyTorch converter see the same names and shapes."""
  def shapes(mode):
    config = models.model_config('small')
    config.dense_block = mode
    state = nnx.state(nnx.eval_shape(lambda: models.create_model(config)))
    return jax.tree.map(lambda x: (x.shape, x.dtype), state.to_pure_dict())

  assert shapes('scan') == shapes('unrolled')
  config = models.model_config('tiny')
  config.dense_block = 'loop'
  with pytest.raises(ValueError, match='model.dense_block'):
    models.create_model(config)


# 64 -> 3: few outputs per input, computed as shifted products (but the 1x1).
@pytest.mark.parametrize('in_features, out_features', [(5, 7), (7, 5), (64, 3)])
@pytest.mark.parametrize('kernel_size, padding', [(1, 0), (3, 1), (4, 1)])
def test_conv_gradients_are_xlas(kernel_size, padding, in_features, out_features):
  """``layers.conv_with_nhwc_gradients`` writes its gradients as NHWC convolutions, the kernel
  gradient in either orientation; the values are XLA's."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 8, in_features))
  # Scaled as initialised, so that outputs are about 1 and their sines well conditioned.
  kernel = jax.random.normal(jax.random.key(2), (kernel_size, kernel_size, in_features,
                                                 out_features)) / (kernel_size * in_features**0.5)
  pad = layers.symmetric_padding(padding)
  plain = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding=pad,
                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = functools.partial(layers.conv_with_nhwc_gradients, window_strides=(1, 1), padding=pad,
                           dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  y = plain(x, kernel)
  weights = jax.random.normal(jax.random.key(3), y.shape)
  results = [jax.jit(jax.value_and_grad(
      lambda x, k: jnp.sum(weights * jnp.sin(f(x, k))), (0, 1)))(x, kernel) for f in (ours, plain)]
  for a, b in zip(*map(jax.tree.leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size, kernel_size, padding', [
    ((8, 8), 4, ((1, 1), (1, 1))),  # The stem's.
    ((7, 9), 4, ((1, 1), (1, 1))),  # Odd sizes: the last row and column are read by no output.
    ((9, 6), 2, ((0, 0), (0, 1))),
    ((10, 7), 4, ((2, 1), (0, 2))),
    ((6, 6), 6, ((2, 2), (2, 2))),
])
def test_stride_two_conv_gradients_are_xlas(size, kernel_size, padding):
  """``layers.conv_with_nhwc_gradients``' stride-2 convs with even kernels: XLA's values and
  gradients, the gradients computed by convolutions with neither operand dilated, the forward
  by the stride-2 convolution alone."""
  x = jax.random.normal(jax.random.key(1), (2, *size, 3))
  kernel = jax.random.normal(jax.random.key(2), (kernel_size, kernel_size, 3, 5))
  plain = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 2), padding=padding,
                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = functools.partial(layers.conv_with_nhwc_gradients, window_strides=(2, 2),
                           padding=padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  weights = jax.random.normal(jax.random.key(3), plain(x, kernel).shape)
  loss = lambda f: lambda x, k: jnp.sum(weights * jnp.sin(f(x, k)))
  results = [jax.jit(jax.value_and_grad(loss(f), (0, 1)))(x, kernel) for f in (ours, plain)]
  for a, b in zip(*map(jax.tree.leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  def convolutions(function, *args):
    text = jax.export.export(jax.jit(function), platforms=('cpu',))(*args).mlir_module()
    return [line for line in text.splitlines() if 'stablehlo.convolution' in line]

  forward = convolutions(ours, x, kernel)
  assert len(forward) == 1 and 'stride = [2, 2]' in forward[0]
  gradients = convolutions(jax.grad(loss(ours), (0, 1)), x, kernel)
  assert gradients and not any('dilate' in c for c in gradients), gradients
  assert any('dilate' in c for c in convolutions(jax.grad(loss(plain), (0, 1)), x, kernel))


@pytest.mark.parametrize('in_features, out_features, kernel_size, padding, shifted', [
    (64, 3, 3, ((1, 1), (1, 1)), True),  # The AiF output conv.
    (64, 1, 3, ((1, 1), (1, 1)), True),  # The depth output conv.
    (64, 16, 2, ((1, 0), (0, 1)), True),  # An up-convolution's phase, 4 x 16 outputs per input.
    (64, 32, 2, ((1, 0), (0, 1)), False),
    (128, 32, 3, ((1, 1), (1, 1)), False),  # A dense layer's.
    (64, 32, 1, ((0, 0), (0, 0)), False),  # One tap: a conv already reads each input once.
])
def test_convs_with_few_outputs_are_shifted_products(in_features, out_features, kernel_size,
                                                     padding, shifted):
  """Where a conv has at most one output per input and tap, its forward is one matrix product
  and a sum of shifted windows instead of a convolution (faster on XLA's CPU backend); its
  gradients stay convolutions."""
  conv = lambda x, k: layers.conv_with_nhwc_gradients(
      x, k, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  x = jnp.ones((1, 6, 6, in_features))
  kernel = jnp.ones((kernel_size, kernel_size, in_features, out_features))

  def ops(function, *args):
    text = jax.jit(function).lower(*args).as_text()
    return {op: text.count(f'stablehlo.{op}') for op in ('convolution', 'dot_general')}

  forward = ops(conv, x, kernel)
  assert forward == ({'convolution': 0, 'dot_general': 1} if shifted else
                     {'convolution': 1, 'dot_general': 0})
  # The forward's and two convolutions.
  gradients = ops(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1)), x, kernel)
  assert gradients == {**forward, 'convolution': forward['convolution'] + 2}


def test_conv_kernel_gradient_moves_the_fewer_channels():
  """The kernel gradient of a 16 -> 2 conv with NHWC gradients moves the output gradient's 2
  channels in front of the images, not the input's 16 (XLA's CPU backend does, a copy 8x
  larger)."""
  x = jnp.ones((3, 8, 8, 16))
  kernel = jnp.ones((3, 3, 16, 2))

  loss = lambda k: jnp.sum(jnp.sin(layers.conv_with_nhwc_gradients(
      jax.nn.relu(2 * x), k, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  program = jax.jit(jax.grad(loss)).lower(kernel).compile().as_text()
  # Channels in front of (8, 8) positions padded to (10, 10) and 3 images: the operand moved.
  assert set(re.findall(r'f32\[(\d+),10,10,3\]', program)) == {'2'}


def test_conv_kernel_gradient_copies_its_input_once_written():
  """The kernel gradient's channels-first copy of the conv's input reads the input XLA wrote,
  one operand: fused with the BatchNorm and ReLU that made it, XLA's CPU backend recomputes them
  in the copy's order, 5x slower."""
  loss = lambda kernel, x, scale: jnp.sum(jnp.sin(layers.conv_with_nhwc_gradients(
      jax.nn.relu(scale * x + 1), kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  program = jax.jit(jax.grad(loss)).lower(
      jnp.ones((3, 3, 16, 16)), jnp.ones((3, 8, 8, 16)), jnp.ones(16)).compile().as_text()
  copies = re.findall(r'= f32\[16,10,10,3\]\{[\d,]+\} (?:fusion|copy|transpose|pad)\(([^)]*)\)',
                      program)
  assert copies and all(operands.count('%') == 1 for operands in copies), copies


@pytest.mark.parametrize('in_features, out_features', [(16, 2), (2, 16)])
def test_conv_kernel_gradient_is_an_unpadded_conv(in_features, out_features):
  """The kernel gradient, a conv whose window is the size of the image, reads an operand padded
  in its channels-first copy and pads nothing itself: Eigen checks each element of a padded
  window against the bounds (an eighth to a fifth of the time)."""
  loss = lambda kernel, x: jnp.sum(jnp.sin(layers.conv_with_nhwc_gradients(
      jax.nn.relu(x), kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  program = jax.jit(jax.grad(loss)).lower(
      jnp.ones((3, 3, in_features, out_features)), jnp.ones((3, 8, 8, in_features))).compile()
  windows = re.findall(r'convolution\(.*window=\{([^}]*)\}', program.as_text())
  image_sized = [window for window in windows if 'size=8x8' in window]
  assert len(image_sized) == 1 and 'pad=' not in image_sized[0], windows


_COUNT_ALL_REDUCES = """
import jax, jax.numpy as jnp
from hded_jax.models import layers
mesh = jax.make_mesh((2,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((4, 8, 8, 16)), jax.NamedSharding(mesh, jax.P('data')))
for conv in (layers.conv_with_nhwc_gradients, jax.lax.conv_general_dilated):
  loss = lambda kernel, x: jnp.sum(jnp.sin(conv(jax.nn.relu(x), kernel, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  program = jax.jit(jax.grad(loss)).lower(jnp.ones((3, 3, 16, 16)), x).compile().as_text()
  print(program.count(' all-reduce('), program.count(' all-reduce-start('))
"""


def test_conv_kernel_gradient_copy_costs_no_collective_on_a_sharded_batch():
  """Over a batch sharded across devices, the written copy's predicate needs no collective: as
  many all-reduces as XLA's own gradient."""
  env = {**os.environ, 'XLA_FLAGS': forced_devices_xla_flags(2), 'JAX_PLATFORMS': 'cpu'}
  ours, xlas = subprocess.run([sys.executable, '-c', _COUNT_ALL_REDUCES], cwd=REPO, env=env,
                              capture_output=True, text=True, check=True).stdout.splitlines()
  assert ours == xlas and xlas != '0 0'


def test_remat_keeping_conv_outputs_recomputes_the_same_function_from_fewer_residuals():
  image = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  configs = {}
  for name, overrides in (('none', {}), ('nothing', dict(remat=True)),
                          ('conv_outputs', dict(remat=True, remat_policy='conv_outputs'))):
    configs[name] = models.model_config('tiny')
    configs[name].update(overrides)
  _assert_trees_close(_outputs_grads_and_stats(configs['conv_outputs'], image, train=True),
                      _outputs_grads_and_stats(configs['none'], image, train=True))

  def saved_bytes(config):  # The VJP function's leaves are the residuals kept for backward.
    graphdef, params, rest = nnx.split(models.create_model(config), nnx.Param, ...)
    def backward(params):
      def loss(params):
        out = nnx.merge(graphdef, params, rest, copy=True)(image, rngs=nnx.Rngs(dropout=0))
        return jnp.sum(out['depth']) + jnp.sum(out['aif'])
      return jax.vjp(loss, params)[1]
    return sum(r.size * r.dtype.itemsize for r in jax.tree.leaves(jax.eval_shape(backward, params)))

  sizes = {name: saved_bytes(config) for name, config in configs.items()}
  assert sizes['nothing'] < sizes['conv_outputs'] < 0.6 * sizes['none']
  configs['none'].remat, configs['none'].remat_policy = True, 'everything'
  with pytest.raises(ValueError, match='model.remat_policy'):
    models.create_model(configs['none'])


def _up_conv_value_and_grads(x, out_features, up_conv, conv_gradients, dtype=jnp.float32):
  """An ``UpConv``'s sum of sines over ``x`` and its gradients (parameters, ``x``), and how many
  convolutions that program holds."""
  formulations = layers.Formulations(up_conv=up_conv, conv_gradients=conv_gradients,
                                     pointwise_convs='conv')
  up = layers.UpConv(x.shape[-1], out_features, formulations=formulations, dtype=dtype,
                     rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(up)
  function = jax.jit(jax.value_and_grad(lambda params, x: jnp.sum(jnp.sin(
      nnx.merge(graphdef, params)(x.astype(dtype)).astype(jnp.float32))), (0, 1)))
  return function(params, x), function.lower(params, x).as_text().count('stablehlo.convolution')


@pytest.mark.parametrize('gradients', sorted(layers.CONV_GRADIENTS))
@pytest.mark.parametrize('mode', sorted(layers.UP_CONVS))
def test_up_conv_formulations_compute_the_transposed_conv(mode, gradients):
  """Values and both gradients of each up-convolution formulation, built from convolutions
  with either kind of gradient, against 'transpose' with XLA's own."""
  x = jax.random.normal(jax.random.key(1), (2, 6, 10, 5))
  (ours, _), (expected, _) = (_up_conv_value_and_grads(x, 7, mode, gradients),
                              _up_conv_value_and_grads(x, 7, 'transpose', 'xla'))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gradients', ['nhwc', 'xla'])
@pytest.mark.parametrize('mode, forward, backward', [('phases', 4, 5), ('phase_channels', 1, 2)])
def test_up_conv_gradients_are_products_where_the_kernel_outgrows_the_windows(
    mode, forward, backward, gradients):
  """With the CPU's conv gradients, an up-convolution with more input channels than input
  positions (the first one at 8x8) takes both gradients from matrix products with the output
  gradient's windows instead of its ``backward`` convolutions: XLA's values."""
  x = jax.random.normal(jax.random.key(1), (1, 2, 3, 8))
  (ours, convolutions), (expected, _) = (_up_conv_value_and_grads(x, 5, mode, gradients),
                                         _up_conv_value_and_grads(x, 5, 'transpose', 'xla'))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert convolutions == forward + (0 if gradients == 'nhwc' else backward)
  # In bfloat16 too (XLA's CPU matrix products take no bfloat16 operands with float32 results).
  bfloat16, _ = _up_conv_value_and_grads(x, 5, mode, gradients, jnp.bfloat16)
  for a, b in zip(jax.tree.leaves(bfloat16), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('mode, expected', [
    # Four phase convolutions, the stride-2 input gradient, the phases' kernel gradient.
    ('phases', [(1, 1)] * 4 + [(2, 2)] + [(1, 1)] * 4),
    ('phase_channels', [(1, 1), (2, 2), (1, 1)]),  # The four phases as one.
    ('transpose', ['dilated']),  # JAX differentiates it.
    ('transpose_strided_grads', ['dilated', (2, 2)]),
])
def test_up_convs_are_made_of_the_chosen_convolutions(mode, expected, monkeypatch):
  """Every convolution an up-convolution's value and gradients are computed with is the
  ``conv_gradients`` one: on the CPU the phases' kernel gradients are then NHWC convolutions,
  faster than XLA's own (docs/performance.md)."""
  calls = []

  def recording(lhs, rhs, window_strides, padding, **kwargs):
    calls.append('dilated' if kwargs.get('lhs_dilation') else tuple(window_strides))
    return layers.conv_with_nhwc_gradients(lhs, rhs, window_strides, padding, **kwargs)

  monkeypatch.setitem(layers.CONV_GRADIENTS, 'nhwc', recording)
  formulations = layers.Formulations(up_conv=mode, conv_gradients='nhwc', pointwise_convs='conv')
  up = layers.UpConv(5, 7, formulations=formulations, dtype=jnp.float32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(up)
  jax.grad(lambda params, x: jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x))), (0, 1))(
      params, jnp.ones((2, 6, 10, 5)))
  assert calls == expected


def test_strided_grads_up_conv_has_a_stride_two_kernel_gradient():
  """JAX's kernel gradient of ``conv_transpose`` dilates its input (XLA's GPU backend turns
  that into a reversed image-sized window that cuDNN runs as a slow forward convolution); the
  'transpose_strided_grads' one is a stride-2 conv's kernel gradient, dilating the other
  operand, which XLA hands cuDNN as a kernel gradient (the stem's stride-2 convs' are)."""
  x, kernel = jnp.ones((2, 8, 8, 4)), jnp.ones((4, 4, 4, 3))
  def convolutions(mode):
    loss = lambda x, k: jnp.sum(jnp.sin(layers.UP_CONVS[mode](x, k)))
    text = jax.export.export(jax.jit(jax.grad(loss, (0, 1))), platforms=('cuda',))(
        x, kernel).mlir_module()
    return [line for line in text.splitlines() if 'stablehlo.convolution' in line]

  assert [('lhs_dilate' in c, 'rhs_dilate' in c) for c in convolutions('transpose')] == [
      (True, False), (True, False), (False, False)]
  assert [('lhs_dilate' in c, 'rhs_dilate' in c)
          for c in convolutions('transpose_strided_grads')] == [
              (True, False), (False, False), (False, True)]


def _formulations(model):
  """(the conv_general_dilated functions of the convolutions and of those the up-convolutions
  are made of, the up-convolutions' modes)."""
  nodes = [node for _, node in nnx.iter_graph(model)]
  up_convs = [node for node in nodes if isinstance(node, layers.UpConv)]
  return ({node.conv_general_dilated for node in nodes if isinstance(node, nnx.Conv)}
          | {layers.CONV_GRADIENTS[node.conv_gradients] for node in up_convs},
          {node.mode for node in up_convs})


def test_auto_formulations_are_the_platforms():
  """'auto' builds the CPU formulations for the CPU (the default backend here), XLA's own
  convolution gradients with the up-convolutions as phases and the 1x1 convolutions as matrix
  products for GPUs, XLA's own for TPUs; a named formulation is built for every platform."""
  config = models.model_config('tiny')
  cpu = ({layers.conv_with_nhwc_gradients}, {'phases'})
  gpu = ({jax.lax.conv_general_dilated, layers.pointwise_conv_as_dot}, {'phases'})
  xla = ({jax.lax.conv_general_dilated}, {'transpose'})
  assert _formulations(models.create_model(config)) == cpu
  assert _formulations(models.create_model(config, platform='cpu')) == cpu
  for platform in ('gpu', 'cuda', 'rocm'):
    assert _formulations(models.create_model(config, platform=platform)) == gpu, platform
  assert _formulations(models.create_model(config, platform='tpu')) == xla
  config.update(conv_gradients='xla', up_conv='transpose', pointwise_convs='conv')
  for platform in ('cpu', 'gpu'):
    assert _formulations(models.create_model(config, platform=platform)) == xla, platform
  config.update(conv_gradients='nhwc', up_conv='phases', pointwise_convs='dot')
  for platform in ('cpu', 'tpu'):
    assert _formulations(models.create_model(config, platform=platform)) == (
        {layers.conv_with_nhwc_gradients, layers.pointwise_conv_as_dot}, {'phases'}), platform


@pytest.mark.parametrize('option, mode', [('up_conv', 'pixel_shuffle'),
                                          ('conv_gradients', 'fast'),
                                          ('pointwise_convs', 'matmul')])
def test_unknown_formulation_is_a_clear_error(option, mode):
  config = models.model_config('tiny')
  config[option] = mode
  with pytest.raises(ValueError, match=f'model.{option}=.*choose "auto" or one of'):
    models.create_model(config)
