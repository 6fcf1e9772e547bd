"""The GPU and TPU programs, lowered on this machine: no CPU-only path leaks into them."""

from unittest import mock

from flax import nnx
import pytest

from hded_jax import benchmark_lib
from hded_jax import lowering
from hded_jax import models
from hded_jax.models import layers
from tests.conftest import tiny_config

_ALL = (*lowering.PLATFORMS, 'cpu')


def _lowered(**model_overrides):
  """The op counts of the tiny config's train step and eval forward, its convolution and
  up-convolution counts, and how many up-convolutions took their gradients from matrix
  products (on the CPU, where the kernel is larger than the output gradient's windows)."""
  config = tiny_config('unused')
  config.model.update(model_overrides)
  model = models.create_model(config.model)
  count = lambda kind: sum(isinstance(node, kind) for _, node in nnx.iter_graph(model))
  with mock.patch.object(layers, '_upsampling_conv_gradients_as_products',
                         wraps=layers._upsampling_conv_gradients_as_products) as products:
    counts = benchmark_lib.lowered_op_counts(config, _ALL)
  return counts, count(nnx.Conv), count(layers.UpConv), products.call_count


def _pointwise_convs(config):
  return sum(isinstance(node, nnx.Conv) and node.kernel_size == (1, 1)
             for _, node in nnx.iter_graph(models.create_model(config.model)))


def test_gpu_and_tpu_programs_have_their_platforms_convolutions_and_no_cpu_paths():
  counts, convs, up_convs, product_gradients = _lowered()
  # Forward, kernel gradient and input gradient of every convolution; the first one's input
  # (the image) needs no gradient. An up-convolution is one conv_transpose on TPUs; on GPUs four
  # phase convolutions (and their kernel gradients) with a one-convolution input gradient, and
  # the 1x1 convolutions are matrix products.
  pointwise = _pointwise_convs(tiny_config('unused'))
  for platform in lowering.PLATFORMS:
    gpu = platform == 'cuda'
    convs_here = convs - (pointwise if gpu else 0)
    train = 3 * (convs_here + up_convs) - 1 + (6 * up_convs if gpu else 0)
    eval_ = convs_here + up_convs + (3 * up_convs if gpu else 0)
    for program, expected in (('train', train), ('eval', eval_)):
      c = counts[program][platform]
      assert c['convolutions'] == expected, (program, platform)
      assert c['distinct_convolutions'] <= expected
      assert c['custom_calls'] == {}, (program, platform)  # No host callbacks.
      assert c['constant_bytes'] < 1024, (program, platform)  # No arrays baked in.
    assert counts['train'][platform]['ops'] < 7_200, platform  # 6,275 with jax 0.10.
  # The CPU program computes each up-convolution as four phase convolutions (and their kernel
  # gradients) with a one-convolution input gradient: 9 instead of 3, or 4 where its gradients
  # are matrix products. A convolution with at most one output per input and tap, a phase
  # included, is a matrix product forward.
  train = 3 * (convs + up_convs) - 1
  forward_products = _forward_products()
  assert forward_products  # The output convolution to the depth map (16 -> 1).
  assert product_gradients  # The first up-convolution's, at 1x1 with 4 images.
  assert counts['train']['cpu']['convolutions'] == (
      train + 6 * up_convs - forward_products - 5 * product_gradients)
  assert counts['eval']['cpu']['convolutions'] == convs + 4 * up_convs - forward_products


def _forward_products(**model_overrides):
  """How many of the tiny config's CPU model's convolutions (up-convolutions' phases included)
  compute their forward as a matrix product (``layers._conv_as_shifted_products``)."""
  config = tiny_config('unused')
  config.model.update(model_overrides)
  few_outputs = lambda kh, kw, in_features, out_features: (
      kh * kw > 1 and kh * kw * out_features <= in_features)
  count = 0
  for _, node in nnx.iter_graph(models.create_model(config.model, platform='cpu')):
    if isinstance(node, nnx.Conv) and node.strides in (1, (1, 1)):
      count += few_outputs(*node.kernel.shape)
    elif isinstance(node, layers.UpConv) and node.mode == 'phases':
      count += 4 * few_outputs(2, 2, *node.kernel.shape[2:])
    elif isinstance(node, layers.UpConv) and node.mode == 'phase_channels':
      in_features, out_features = node.kernel.shape[2:]
      count += few_outputs(2, 2, in_features, 4 * out_features)
  return count


def test_up_conv_option_picks_one_formulation_on_every_backend():
  """For measuring them against each other: 'phases' puts the phase convolutions in the GPU
  and TPU programs, 'phase_channels' one convolution for the four phases (and one for their
  kernel gradients), 'transpose' (and 'transpose_strided_grads') one conv_transpose in the CPU
  one (where the convolutions with few outputs per input are matrix products forward, and the
  phases' gradients where the kernel is larger than the output gradient's windows)."""
  # Per up-convolution: the convolutions beyond the three of a plain one, and those that
  # matrix products replace as its gradients on the CPU (the kernel gradient's, the input's).
  distinct = {}
  for mode, extra, gradients in (('phases', 6, 5), ('phase_channels', 0, 2), ('transpose', 0, 0),
                                 ('transpose_strided_grads', 0, 0)):
    counts, convs, up_convs, product_gradients = _lowered(up_conv=mode, pointwise_convs='conv')
    expected = 3 * (convs + up_convs) - 1 + extra * up_convs
    forward_products = _forward_products(up_conv=mode, pointwise_convs='conv')
    assert {p: c['convolutions'] for p, c in counts['train'].items()} == {
        **dict.fromkeys(_ALL, expected),
        'cpu': expected - forward_products - gradients * product_gradients}, mode
    distinct[mode] = counts['train']['cuda']['distinct_convolutions']
  # One convolution shape per up-convolution and pass, as one conv_transpose has, for XLA's GPU
  # autotuner to search (the phases have four forward and four kernel gradient ones).
  assert distinct['phase_channels'] == distinct['transpose'] < distinct['phases'], distinct


def test_pointwise_convs_as_dots_leave_the_programs_convolutions():
  """With ``pointwise_convs='dot'`` each 1x1 convolution's three passes are matrix products on
  every backend, and nothing else changes."""
  pointwise = _pointwise_convs(tiny_config('unused'))
  assert pointwise > 0
  convs = {mode: _lowered(pointwise_convs=mode)[0]['train'] for mode in ('conv', 'dot')}
  for platform in _ALL:
    assert convs['conv'][platform]['convolutions'] - convs['dot'][platform]['convolutions'] == (
        3 * pointwise), platform
    assert convs['dot'][platform]['custom_calls'] == {}, platform


def test_scanned_dense_blocks_lower_each_block_once():
  """Each dense block's two convolutions (and their gradients) appear once, not per layer."""
  counts = {mode: _lowered(block_sizes=(2, 3, 4, 3), dense_block=mode,
                          pointwise_convs='conv')[0]['train']['cuda']
            for mode in ('unrolled', 'scan')}
  per_layer_convs = 6 * (2 + 3 + 4 + 3)  # Two convolutions a layer, three passes each.
  assert counts['unrolled']['convolutions'] - counts['scan']['convolutions'] == (
      per_layer_convs - 6 * 4)
  assert counts['scan']['distinct_convolutions'] < counts['unrolled']['distinct_convolutions']
  assert counts['scan']['custom_calls'] == {}


def test_flattened_adam_takes_fewer_ops_on_every_platform():
  """optimizer.flatten: one Adam update over all the parameters instead of one per parameter
  (the full model's cuda train step at bf16 batch 32: 25,892 -> 16,182 ops)."""
  config = tiny_config('unused')
  per_parameter = benchmark_lib.lowered_op_counts(config, _ALL)['train']
  config.optimizer.flatten = True
  flat = benchmark_lib.lowered_op_counts(config, _ALL)['train']
  for platform in _ALL:
    assert flat[platform]['ops'] < 0.8 * per_parameter[platform]['ops'], platform
    assert flat[platform]['convolutions'] == per_parameter[platform]['convolutions'], platform


def test_matmul_precision_reaches_every_convolution_and_product_gradients_included():
  """model.matmul_precision='float32' makes every convolution and matrix product of the train
  step and of the eval forward HIGHEST on every backend, the layers' custom gradients included
  (traced after the model's call has returned); 'default' leaves each to the platform."""
  config = tiny_config('unused')
  default = benchmark_lib.lowered_op_counts(config, _ALL)
  config.model.matmul_precision = 'float32'
  full = benchmark_lib.lowered_op_counts(config, _ALL)
  for program in ('train', 'eval'):
    for platform in _ALL:
      products = sum(default[program][platform]['precisions'].values())
      assert products >= default[program][platform]['convolutions'] > 0, (program, platform)
      assert default[program][platform]['precisions'] == {'DEFAULT': products}
      assert full[program][platform]['precisions'] == {'HIGHEST': products}, (program, platform)


def test_count_ops_reads_stablehlo_text():
  convolution = ('stablehlo.convolution({}, %arg1) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->'
                 '[b, 0, 1, f], window = {{pad = [[1, 1], [1, 1]]}} : (tensor<1x4x4x2xf32>, '
                 'tensor<3x3x2x2xf32>) -> tensor<1x4x4x2xf32> loc(#loc{})')
  product = ('stablehlo.dot_general %1, %1, contracting_dims = [2] x [2], precision = [HIGHEST, '
             'HIGHEST] : (tensor<4x4x2xf32>, tensor<4x4x2xf32>) -> tensor<4x4xf32>')
  text = f'''
  func.func public @main(%arg0: tensor<1x4x4x2xf32>, %arg1: tensor<3x3x2x2xf32>) {{
    %0 = {convolution.format('%arg0', 1)}
    %1 = {convolution.format('%0', 2)}
    %2 = stablehlo.reduce(%1 init: %cst) applies stablehlo.add across dimensions = [0]
    %3 = stablehlo.custom_call @Sharding(%2) : (tensor<4x4x2xf32>) -> tensor<4x4x2xf32>
    %cst = stablehlo.constant dense<"0x0000803F00000040"> : tensor<2xf32>
    %5 = {product}
    %4:2 = "stablehlo.case"(%c) ({{
      stablehlo.return %3, %3 : tensor<4x4x2xf32>, tensor<4x4x2xf32>
    }}) : (tensor<i32>) -> (tensor<4x4x2xf32>, tensor<4x4x2xf32>)
    return %4#0 : tensor<4x4x2xf32>
  }}'''
  assert lowering.count_ops(text) == {
      'ops': 9, 'convolutions': 2, 'distinct_convolutions': 1, 'custom_calls': {'Sharding': 1},
      'constant_bytes': 8, 'precisions': {'DEFAULT': 2, 'HIGHEST': 1}}


def test_autotuned_calls_count_the_distinct_cudnn_and_cublas_calls_of_a_compiled_gpu_program():
  # As `Compiled.as_text()` prints a GPU program: operands by name, types at their definitions.
  hlo = '''
  %p.0 = bf16[8,16,16,32]{3,2,1,0} parameter(0)
  %p.1 = bf16[3,3,32,32]{3,2,1,0} parameter(1)
  %p.2 = bf16[8,8,8,32]{3,2,1,0} parameter(2)
  %cudnn-conv.1 = (bf16[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%p.0, %p.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="a" scheduling_name="cudnn-conv.1"}
  %cudnn-conv.2 = (bf16[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%p.0, %p.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="b" scheduling_name="cudnn-conv.2"}
  %cudnn-conv.3 = (bf16[8,8,8,32]{3,2,1,0}, u8[0]{0}) custom-call(%p.2, %p.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="c"}
  %custom-call.4 = (bf16[2048,32]{1,0}, s8[1024]{0}) custom-call(%bitcast.1, %bitcast.2), custom_call_target="__cublas$lt$matmul", metadata={op_name="d"}
  %custom-call.5 = f32[8]{0} custom-call(%p.0), custom_call_target="SomethingElse"
  %fusion.6 = bf16[64,64]{1,0} fusion(%p.0), kind=kCustom, calls=%f, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  '''
  assert lowering.autotuned_calls(hlo) == {
      'cudnn_convolutions': 3, 'distinct_cudnn_convolutions': 2, 'cublas_gemms': 1,
      'distinct_cublas_gemms': 1, 'triton_fusions': 1}


def test_collectives_count_each_one_written_in_a_compiled_program():
  # As `Compiled.as_text()` prints them: asynchronous pairs count once (by their start), a
  # combined all-reduce of several arrays once.
  hlo = '''
  %all-reduce-start.2 = f32[32]{0} all-reduce-start(%wrapped_concatenate), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%region_0.1.clone
  %all-reduce-done.2 = f32[32]{0} all-reduce-done(%all-reduce-start.2)
  %all-reduce-start.3 = ((f32[2048]{0}), f32[2048]{0}) all-reduce-start(%fusion.2), channel_id=4, replica_groups=mesh['data'=8,'model'=1] {'data'}, to_apply=%add, metadata={op_name="jit(train_step)/all-reduce-start(x)" scheduling_name="all-reduce-start.3"}
  %all-reduce-done.3 = f32[2048]{0} all-reduce-done(%all-reduce-start.3)
  %all-reduce.7 = (f32[3,3,9,9]{3,1,0,2}, f32[2880]{0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  ROOT %all-gather.1 = bf16[8,16]{1,0} all-gather(%c), channel_id=3, dimensions={0}
  %fusion.3 = f32[32]{0} fusion(%all-reduce-done.2), kind=kLoop, calls=%all-reduce_like_name
  '''
  assert lowering.collectives(hlo) == {'all-gather': 1, 'all-reduce': 3}
  assert lowering.collectives('%fusion.1 = f32[8]{0} fusion(%p.0), kind=kLoop') == {}
  # A combined all-reduce of six or more arrays: its tuple type numbers its elements.
  combined = ('%all-reduce.9 = (f32[4]{0}, f32[4]{0}, f32[4]{0}, f32[4]{0}, f32[4]{0}, '
              '/*index=5*/f32[4]{0}) all-reduce(%a, %b, %c, %d, %e, %f), to_apply=%add')
  assert lowering.collectives(combined) == {'all-reduce': 1}


def test_kernel_launches_count_what_the_entry_computation_runs_on_the_device():
  # As `Compiled.as_text()` prints a GPU program; the fusions' own computations come first and
  # launch nothing themselves.
  hlo = '''
%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add.0 = f32[8]{0} add(%p0, %p0)
}

ENTRY %main.1 (p.0: f32[8], p.1: bf16[8,16,16,32]) -> (f32[8], f32[8]) {
  %p.0 = f32[8]{0} parameter(0)
  %p.1 = bf16[8,16,16,32]{3,2,1,0} parameter(1)
  %constant.1 = f32[] constant(0)
  %cudnn-conv.1 = (bf16[8,16,16,32]{3,2,1,0}, u8[0]{0}) custom-call(%p.1, %p.1), custom_call_target="__cudnn$convForward"
  %get-tuple-element.1 = bf16[8,16,16,32]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %bitcast.1 = bf16[8,8192]{1,0} bitcast(%get-tuple-element.1)
  %loop_fusion.1 = (f32[8]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, f32[8]{0}, /*index=5*/f32[8]{0}) fusion(%p.0), kind=kLoop, calls=%fused_add
  %input_reduce_fusion = f32[8]{0} fusion(%bitcast.1), kind=kInput, calls=%fused_add
  %all-reduce-start.1 = f32[8]{0} all-reduce-start(%input_reduce_fusion), to_apply=%fused_add
  %all-reduce-done.1 = f32[8]{0} all-reduce-done(%all-reduce-start.1)
  %copy.1 = f32[8]{0} copy(%all-reduce-done.1)
  ROOT %tuple.1 = (f32[8]{0}, f32[8]{0}) tuple(%copy.1, %p.0)
}
'''
  assert lowering.kernel_launches(hlo) == {
      'fusions': 2, 'custom_calls': 1, 'copies': 1, 'other': 1, 'total': 5}
  with pytest.raises(ValueError, match='No entry computation'):
    lowering.kernel_launches('%fusion.1 = f32[8]{0} fusion(%p.0), kind=kLoop')


def test_command_buffers_count_what_the_host_submits_per_run():
  # As XLA dumps a GPU program's thunk sequence after its thunk passes: the thunks recorded
  # into a command buffer are indented under it.
  thunks = '''000: kCommandBuffer  [source        | next=091 (1)  ]
    001: kCopy         [source        | next=002 (1) ] kCopy
    002: kCustomKernel [prev=001 (1)  | next=004 (2) ] loop_select_fusion_18 grid: [1, 1, 1]
    003: kCublasLtMatmul [prev=001 (2)  | next=004 (1) ] kCublasLtMatmul
091: kConvolution    [prev=000 (1)  | next=092 (1)  ] kConvolution
092: kCustomKernel   [prev=091 (1)  | next=093 (1)  ] input_reduce_fusion_57 grid: [1, 1, 1]
093: kConvolution    [prev=092 (1)  | next=000 (1)  ] kConvolution
000: kCommandBuffer  [prev=093 (1)  | sink          ]
    094: kCustomKernel [source        | sink         ] loop_add_fusion_5 grid: [1, 1, 1]
'''
  assert lowering.command_buffers(thunks) == {
      'submissions': 5, 'command_buffers': 2, 'in_command_buffers': 4,
      'outside': {'kConvolution': 2, 'kCustomKernel': 1}}
  with pytest.raises(ValueError, match='No thunks'):
    lowering.command_buffers('ENTRY %main.1 () -> f32[] {')
