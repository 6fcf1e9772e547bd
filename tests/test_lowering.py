"""The GPU and TPU programs, lowered on this machine: no CPU-only path leaks into them."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp

from hded_jax import lowering
from hded_jax import models
from hded_jax import train_lib
from hded_jax.models import layers
from tests.conftest import tiny_config


def _train_step(**model_overrides):
  """The jitted train step and abstract arguments, built as ``train_lib.Trainer`` builds them."""
  config = tiny_config('unused')
  config.model.update(model_overrides)
  mesh = train_lib.make_mesh(config.mesh)
  schedule = train_lib.learning_rate_schedule(config, steps_per_epoch=2.0)
  tx = train_lib.make_optimizer(config, schedule)
  model = nnx.eval_shape(lambda: models.create_model(config.model, seed=config.seed))
  graphdef, _, params, batch_stats = train_lib.split_model(model)
  state = jax.eval_shape(
      lambda params, batch_stats: train_lib.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
          opt_state=tx.init(params)), params, batch_stats)
  state_sharding = jax.tree.map(lambda _: train_lib.replicated(mesh), state)
  step = jax.jit(
      functools.partial(train_lib.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                        loss_config=config.loss, dropout_key=jax.random.key(config.seed)),
      in_shardings=(state_sharding, train_lib.batch_sharding(mesh)),
      out_shardings=(state_sharding, train_lib.replicated(mesh)), donate_argnums=0)
  n, (h, w) = config.batch_size, config.dataset.image_size
  batch = {'image': jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32),
           'aif': jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32),
           'depth': jax.ShapeDtypeStruct((n, h, w), jnp.float32)}
  return mesh, step, state, batch, model


def _count(model, kind):
  return sum(isinstance(node, kind) for _, node in nnx.iter_graph(model))


def test_train_step_on_gpu_and_tpu_has_one_conv_per_pass_and_no_cpu_paths():
  mesh, step, state, batch, model = _train_step()
  convs, up_convs = _count(model, nnx.Conv), _count(model, layers.UpConv)
  # Forward, kernel gradient and input gradient of every convolution; the first one's input
  # (the image) needs no gradient. An up-convolution is one conv_transpose there.
  expected = 3 * (convs + up_convs) - 1
  with jax.set_mesh(mesh):
    counts = lowering.op_counts(step, state, batch)
    cpu = lowering.count_ops(step.lower(state, batch).as_text())
  for platform in lowering.PLATFORMS:
    assert counts[platform]['convolutions'] == expected, platform
    assert counts[platform]['distinct_convolutions'] <= expected
    assert counts[platform]['custom_calls'] == {}, platform  # No host callbacks.
    assert counts[platform]['constant_bytes'] < 1024, platform  # No arrays baked in.
    assert counts[platform]['ops'] < 9_000, platform  # 7,860 with jax 0.10.
  # The CPU program computes each up-convolution as four phase convolutions (and their kernel
  # gradients) with a one-convolution input gradient: 9 instead of 3.
  assert cpu['convolutions'] == expected + 6 * up_convs


def test_up_conv_option_picks_one_formulation_on_every_backend():
  """For measuring them against each other: 'phases' puts the phase convolutions in the GPU
  and TPU programs, 'transpose' puts one conv_transpose in the CPU one."""
  counts = {}
  for mode in ('phases', 'transpose'):
    mesh, step, state, batch, model = _train_step(up_conv=mode)
    with jax.set_mesh(mesh):
      counts[mode] = lowering.op_counts(step, state, batch, platforms=('cuda',))['cuda']
      counts[mode]['cpu'] = lowering.count_ops(step.lower(state, batch).as_text())['convolutions']
  up_convs = _count(model, layers.UpConv)
  expected = 3 * (_count(model, nnx.Conv) + up_convs) - 1
  assert counts['phases']['convolutions'] == counts['phases']['cpu'] == expected + 6 * up_convs
  assert counts['transpose']['convolutions'] == counts['transpose']['cpu'] == expected


def test_scanned_dense_blocks_lower_each_block_once():
  """Each dense block's two convolutions (and their gradients) appear once, not per layer."""
  counts = {}
  for mode in ('unrolled', 'scan'):
    mesh, step, state, batch, model = _train_step(block_sizes=(2, 3, 4, 3), dense_block=mode)
    with jax.set_mesh(mesh):
      counts[mode] = lowering.op_counts(step, state, batch, platforms=('cuda',))['cuda']
  per_layer_convs = 6 * (2 + 3 + 4 + 3)  # Two convolutions a layer, three passes each.
  assert counts['unrolled']['convolutions'] - counts['scan']['convolutions'] == (
      per_layer_convs - 6 * 4)
  assert counts['scan']['distinct_convolutions'] < counts['unrolled']['distinct_convolutions']
  assert counts['scan']['custom_calls'] == {}


def test_jitted_init_draws_the_weights_on_the_device():
  """Initial weights come from the device's random numbers, not arrays made on the host."""
  config = models.model_config('tiny')
  init = jax.jit(lambda: nnx.state(models.create_model(config)))
  for platform, counts in lowering.op_counts(init).items():
    assert counts['constant_bytes'] < 1024, platform
    assert counts['custom_calls'] == {}, platform


def test_count_ops_reads_stablehlo_text():
  convolution = ('stablehlo.convolution({}, %arg1) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->'
                 '[b, 0, 1, f], window = {{pad = [[1, 1], [1, 1]]}} : (tensor<1x4x4x2xf32>, '
                 'tensor<3x3x2x2xf32>) -> tensor<1x4x4x2xf32> loc(#loc{})')
  text = f'''
  func.func public @main(%arg0: tensor<1x4x4x2xf32>, %arg1: tensor<3x3x2x2xf32>) {{
    %0 = {convolution.format('%arg0', 1)}
    %1 = {convolution.format('%0', 2)}
    %2 = stablehlo.reduce(%1 init: %cst) applies stablehlo.add across dimensions = [0]
    %3 = stablehlo.custom_call @Sharding(%2) : (tensor<4x4x2xf32>) -> tensor<4x4x2xf32>
    %cst = stablehlo.constant dense<"0x0000803F00000040"> : tensor<2xf32>
    %4:2 = "stablehlo.case"(%c) ({{
      stablehlo.return %3, %3 : tensor<4x4x2xf32>, tensor<4x4x2xf32>
    }}) : (tensor<i32>) -> (tensor<4x4x2xf32>, tensor<4x4x2xf32>)
    return %4#0 : tensor<4x4x2xf32>
  }}'''
  assert lowering.count_ops(text) == {
      'ops': 8, 'convolutions': 2, 'distinct_convolutions': 1, 'custom_calls': {'Sharding': 1},
      'constant_bytes': 8}
