"""The benchmark on the tiny model at 32x32: every figure present and plausible."""

import copy
import functools
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import types

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from hded_jax import benchmark_lib
from hded_jax import models
from hded_jax import runtime
from hded_jax import train_lib
from hded_jax.benchmarking import batches
from hded_jax.benchmarking import compile_targets
from hded_jax.benchmarking import largest_batch
from hded_jax.benchmarking import table
from hded_jax.benchmarking import measure
from hded_jax.benchmarking import traces
from tests.conftest import REPO
from tests.conftest import tiny_config


def _positive(value):
  return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_benchmark_writes_every_figure(tmp_path):
  pytest.importorskip('torch')
  output = tmp_path / 'results.json'
  returned = benchmark_lib.run_benchmark(
      # An empty data dir: the pipeline falls back to synthetic frames.
      tiny_config(str(tmp_path / 'tfds'), batch_size=2), steps=2, warmup=1, pipeline_batches=3,
      with_torch=True, max_wait=0.0, output=str(output))
  results = json.loads(output.read_text())
  assert results == json.loads(json.dumps(returned, default=str))
  assert results['config']['batch_size'] == 2 and results['config']['image_size'] == [32, 32]

  jx = results['jax']
  for name in ('train', 'eval'):
    r = jx[name]
    for key in ('lower_s', 'compile_s', 'median_s', 'images_per_s', 'flops', 'flops_per_s',
                'xla_buffer_bytes'):
      assert _positive(r[key]), (name, key, r[key])
    assert r['min_s'] <= r['median_s'] <= r['max_s']
    assert math.isclose(r['images_per_s'], 2 / r['median_s'])
  # Steps dispatched back to back, as training runs them, on both sides.
  for r in (jx['train'], results['torch']['float32']['train']):
    assert _positive(r['pipelined_s'])
    assert math.isclose(r['pipelined_images_per_s'], 2 / r['pipelined_s'])
    assert r['load']['other_busy_cores'] >= 0 and r['load']['loadavg_1min'] >= 0
  # Backward is about twice the forward's work, and training runs forward in train mode too.
  assert 2 * jx['eval']['flops'] < jx['train']['flops'] < 6 * jx['eval']['flops']
  assert _positive(jx['peak_memory_bytes']) and jx['peak_memory_source']
  assert math.isclose(jx['peak_memory_bytes_per_image'], jx['peak_memory_bytes'] / 2)

  pipe = results['pipeline']
  assert _positive(pipe['examples_per_s']) and pipe['source'].startswith('synthetic')
  # The first epoch reads every example; the epochs after it read the ones kept in memory.
  assert _positive(pipe['first_epoch_examples_per_s']) and pipe['keep_resized_gb'] > 0

  for name in ('train', 'eval'):
    assert _positive(results['torch']['float32'][name]['images_per_s'])
  assert results['jax_vs_torch']['best_torch_mode'] == 'float32'
  torch_train = results['torch']['float32']['train']
  assert math.isclose(results['jax_vs_torch']['train_vs_float32'],
                      jx['train']['images_per_s'] / torch_train['images_per_s'])
  assert math.isclose(results['jax_vs_torch']['train_pipelined_vs_float32'],
                      jx['train']['pipelined_images_per_s'] / torch_train['pipelined_images_per_s'])

  printed = table.format_table(returned)
  assert jx['products_in'] == 'float32'
  for text in ('jax float32 train', 'jax float32 eval', 'torch float32 train', 'input pipeline',
               'dispatched back to back: jax', 'matrix products in float32'):
    assert text in printed


@pytest.mark.parametrize('platform, capability, overrides, expected', [
    ('cpu', None, {}, 'float32'),
    ('gpu', '9.0', {}, 'tensorfloat32'),  # H100: XLA's default for float32.
    ('gpu', '9.0', {'NVIDIA_TF32_OVERRIDE': '0'}, 'float32'),
    ('gpu', '9.0', {'matmul_precision': 'float32'}, 'float32'),
    ('gpu', '7.0', {}, 'float32'),  # V100: no TF32.
    ('gpu', 'gfx90a', {}, 'unknown'),
    ('gpu', '9.0', {'dtype': 'bfloat16'}, 'bfloat16'),
    ('tpu', None, {}, 'bfloat16, one pass'),
    ('tpu', None, {'matmul_precision': 'tensorfloat32'}, 'bfloat16, three passes'),
])
def test_products_in_names_what_float32_products_compute_in(platform, capability, overrides,
                                                             expected, monkeypatch):
  """Which PyTorch mode a float32 run compares with: XLA computes float32 in TF32 on recent
  NVIDIA GPUs unless told otherwise."""
  monkeypatch.delenv('NVIDIA_TF32_OVERRIDE', raising=False)
  overrides = dict(overrides)
  if 'NVIDIA_TF32_OVERRIDE' in overrides:
    monkeypatch.setenv('NVIDIA_TF32_OVERRIDE', overrides.pop('NVIDIA_TF32_OVERRIDE'))
  config = tiny_config('unused').model
  config.update(overrides)
  device = types.SimpleNamespace(platform=platform)
  if capability:
    device.compute_capability = capability
  assert benchmark_lib.products_in(config, device) == expected


def test_torch_optimizers_run_in_test_processes_that_imported_tensorflow():
  """Where torch is a CUDA build, it brings Triton, which crashes a process that imported
  TensorFlow first (the benchmark's PyTorch side in a test worker): conftest.py imports it
  before anything imports TensorFlow."""
  pytest.importorskip('triton')
  code = ('import tests.conftest, tensorflow, torch\n'
          'torch.optim.Adam([torch.zeros(1, requires_grad=True)])\nprint("ran")')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0 and 'ran' in run.stdout, run.stderr[-3000:]


def test_torch_baseline_runs_after_the_pipeline_figure_built_the_dataset(tmp_path):
  """The pipeline's figure builds a dataset that is not prepared (TensorFlow imported), then the
  PyTorch side's optimizer imports Triton: the benchmark loads Triton first."""
  pytest.importorskip('triton')
  run = subprocess.run(
      [sys.executable, '-m', 'hded_jax.benchmark', '--config=configs/smoke.py', '--torch',
       '--steps=1', '--warmup=0', '--pipeline_batches=1', '--max_wait=0'],
      cwd=REPO, env=dict(os.environ, TFDS_DATA_DIR=str(tmp_path / 'tfds')), capture_output=True,
      text=True)
  assert run.returncode == 0 and 'torch float32 train' in run.stdout, run.stderr[-3000:]
  assert 'Building synthetic_defocus/tiny' in run.stderr


def test_triton_after_tensorflow_is_reported_not_loaded():
  pytest.importorskip('triton')
  code = ('import sys, tensorflow\nfrom hded_jax import pytorch\npytorch.load_triton_first()\n'
          'print("triton" in sys.modules)')
  run = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert run.returncode == 0 and run.stdout.split()[-1] == 'False', run.stderr[-3000:]
  assert 'TensorFlow was imported before Triton' in run.stderr


def test_torch_flag_without_torch_stops_at_once_and_says_how_to_install_it(tmp_path):
  (tmp_path / 'torch').mkdir()  # Found first on the path, and fails as a missing package does.
  (tmp_path / 'torch' / '__init__.py').write_text(
      "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
  run = subprocess.run(
      [sys.executable, '-m', 'hded_jax.benchmark', '--config=configs/smoke.py', '--torch',
       '--steps=1', '--warmup=0', '--max_wait=0'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO])))
  assert run.returncode != 0
  assert "--torch times the PyTorch reference, which needs PyTorch" in run.stderr
  assert "pip install -e '.[torch]'" in run.stderr
  assert 'Train step' not in run.stderr  # Nothing measured first.


def test_pipeline_only_times_the_input_pipeline_with_worker_processes(tmp_path):
  """``--pipeline_only`` on the command line (grain's worker processes need its parsed flags):
  the pipeline alone, nothing compiled."""
  output = tmp_path / 'pipeline.json'
  run = subprocess.run(
      [sys.executable, '-m', 'hded_jax.benchmark', '--config=configs/nyu.py', '--pipeline_only',
       f'--config.dataset.data_dir={tmp_path / "tfds"}', '--config.batch_size=2',
       '--config.dataset.num_workers=1', '--config.dataset.num_threads=1',
       '--pipeline_batches=3', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(output.read_text())
  assert 'jax' not in results and _positive(results['pipeline']['examples_per_s'])
  assert results['pipeline']['num_workers'] == 1 and results['pipeline']['num_threads'] == 1
  assert '1 threads, 1 worker processes' in run.stdout


def test_benchmark_reports_what_rendering_the_inputs_adds(tmp_path):
  config = tiny_config(str(tmp_path / 'tfds'), batch_size=2)
  jx = benchmark_lib.benchmark_jax(config, steps=1, warmup=0, max_busy_cores=1e9,
                                   max_wait=0.0, rendering=True)
  render = jx['rendering']
  assert render['mode'] == 'clean' and not render['step_renders']
  assert render['camera']['focus_distance'] == benchmark_lib.RENDERING_FOCUS_RANGE
  assert _positive(render['median_s']) and _positive(render['overhead'])
  assert _positive(render['compile_s'])
  assert math.isclose(render['overhead'], render['median_s'] / jx['train']['median_s'])
  assert 'rendering the inputs (clean' in table.format_table(
      {'config': {'image_size': [32, 32], 'batch_size': 2, 'dtype': 'float32'},
       'machine': {'cpu_count': 2}, 'jax': jx,
       'pipeline': {'examples_per_s': 1.0, 'source': 'x', 'num_threads': 1, 'num_workers': 0}})


def test_on_a_gpu_the_benchmark_counts_the_kernels_each_program_launches(tmp_path, monkeypatch):
  # The CPU stands in for the GPU: the model is built as for a GPU, and the programs' kernel
  # launches are counted from their compiled text as on one.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = tiny_config(str(tmp_path / 'tfds'), batch_size=2)
  jx = benchmark_lib.benchmark_jax(config, steps=1, warmup=0, max_busy_cores=1e9, max_wait=0.0)
  assert jx['backend'] == 'gpu'
  for name in ('train', 'eval'):
    launches = jx[name]['kernel_launches']
    assert launches['fusions'] > 0 and launches['total'] == sum(
        launches[kind] for kind in ('fusions', 'custom_calls', 'copies', 'other'))
  assert jx['train']['kernel_launches']['total'] > jx['eval']['kernel_launches']['total']
  assert 'eval kernels launched per run: ' in table.format_table(
      {'config': {'image_size': [32, 32], 'batch_size': 2, 'dtype': 'float32'},
       'machine': {'cpu_count': 2}, 'jax': jx,
       'pipeline': {'examples_per_s': 1.0, 'source': 'x', 'num_threads': 1, 'num_workers': 0}})


def test_largest_batches_extrapolate_xla_buffers_and_run_the_estimates(tiny_data_dir,
                                                                      monkeypatch):
  config = tiny_config(tiny_data_dir)
  remat = config.copy_and_resolve_references()
  remat.model.remat = True
  compile_lowered = jax.stages.Lowered.compile
  compiles = []
  # The first two programs must be compiling at the same time to pass this barrier.
  together = threading.Barrier(2, timeout=120)

  def compile_(self, **kwargs):
    compiles.append((kwargs.get('compiler_options'), threading.current_thread()))
    if len(compiles) <= 2:
      together.wait()
    return compile_lowered(self, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_)
  results = largest_batch.largest_batches({'plain': config, 'remat': remat},
                                          memory_bytes=64 << 20, compile_threads=4)
  # No program autotunes on a GPU (cold: most of a GPU compile; at the estimate, minutes), and
  # none compiles on the calling thread.
  assert [options for options, _ in compiles] == [{'xla_gpu_autotune_level': 0}] * 6
  assert threading.main_thread() not in {thread for _, thread in compiles}
  for result in results.values():
    assert _positive(result['bytes_per_image'])
    # The estimate ran one step without running out of memory, and its buffers, which on the
    # CPU grow in proportion to the batch, put it within 5% of the limit: the search ended.
    assert result['batch_size'] == result['estimate'] > 4
    [(batch_size, fit, buffer_bytes)] = result['tried']
    assert (batch_size, fit) == (result['estimate'], True) and result['search_ended']
    assert 0.9 * result['memory_bytes'] < buffer_bytes <= result['memory_bytes']
    assert result['batch_size'] % jax.device_count() == 0
  # Compiled beside other programs or alone (as on the CPU by default), the same figures.
  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_lowered)
  assert largest_batch.largest_batches({'plain': config}, memory_bytes=64 << 20) == {
      'plain': results['plain']}


def test_the_largest_batch_search_goes_up_where_the_buffers_grow_less_than_the_batch():
  # Buffers (MiB) of 1 + batch / 4 up to 16, then 5 + (batch - 16) / 8, in 40 MiB: the line
  # through the sizing batches 4 and 16 gives 156; at 156 the buffers (22.5 MiB) draw the line
  # through 16 and 156, which gives 296, the largest.
  mib = 2**20
  buffer_bytes = {4: 2 * mib, 16: 5 * mib, 156: 22.5 * mib}
  search = functools.partial(largest_batch.next_batch_to_try, memory_bytes=40 * mib, unit=4)
  assert search(buffer_bytes, largest_fit=156, smallest_refused=None) == 296
  assert search({**buffer_bytes, 296: 40 * mib}, largest_fit=296, smallest_refused=None) is None
  # At most twice the batch at a time; where the buffers do not grow, twice.
  assert search({4: 2 * mib, 16: 5 * mib, 20: 5.01 * mib}, largest_fit=20,
                smallest_refused=None) == 40
  assert search({4: 2 * mib, 16: 5 * mib, 20: 5 * mib}, largest_fit=20,
                smallest_refused=None) == 40
  # No buffers known for the fit (memory analysis unavailable): nothing to draw a line through.
  assert search({4: 2 * mib, 16: 5 * mib, 156: None}, largest_fit=156,
                smallest_refused=None) is None
  # Refused with nothing fitted: 10% down, in multiples of the devices, not below one a device.
  assert search(buffer_bytes, largest_fit=None, smallest_refused=188) == 168
  assert search(buffer_bytes, largest_fit=None, smallest_refused=4) is None
  # Refused with its buffers known (compiled, as on a GPU) over the memory: the line through
  # them and the largest sizing batch's, aimed 5% below the memory, here 16 + (38 - 5) MiB at
  # (120 - 5) / (1162 - 16) MiB an image: 344. Known and within the memory (it failed at run
  # time): 10% down.
  assert search({4: 2 * mib, 16: 5 * mib, 1162: 120 * mib}, largest_fit=None,
                smallest_refused=1162) == 344
  assert search({4: 2 * mib, 16: 5 * mib, 188: 30 * mib}, largest_fit=None,
                smallest_refused=188) == 168
  # Between a fit and a refusal: halfway, until they are 5% or one batch a device apart.
  assert search(buffer_bytes, largest_fit=148, smallest_refused=168) == 156
  assert search(buffer_bytes, largest_fit=156, smallest_refused=160) is None
  assert search(buffer_bytes, largest_fit=8, smallest_refused=12) is None


# libtpu (the test extra, on Linux x86-64) describes TPU slices without their chips.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                                  reason="needs libtpu: pip install -e '.[tpu]'")


def _compiled_for(tmp_path, monkeypatch, target: str) -> dict:
  """The benchmark's results for the tiny config compiled for ``target``, checked for what every
  target has: each program's compile figures and XLA's buffers against the device's memory."""
  output = tmp_path / 'compiled.json'
  monkeypatch.setattr(train_lib.Trainer, 'initial_state', None)  # Nothing is drawn or run.
  returned = benchmark_lib.run_benchmark(tiny_config(str(tmp_path / 'tfds'), batch_size=8),
                                         compile_for=target, output=str(output))
  results = json.loads(output.read_text())
  assert results == json.loads(json.dumps(returned, default=str))
  compiled = results['compiled_for']
  for name in ('train', 'eval'):
    r = compiled[name]
    for key in ('lower_s', 'compile_s', 'flops', 'xla_buffer_bytes_per_device'):
      assert _positive(r[key]), (name, key, r[key])
    assert math.isclose(r['share_of_memory'],
                        r['xla_buffer_bytes_per_device'] / compiled['memory_bytes'])
  assert 2 * compiled['eval']['flops'] < compiled['train']['flops'] < 6 * compiled['eval']['flops']
  assert 'jax' not in results and 'pipeline' not in results
  text = table.format_table(results)
  assert text.splitlines()[2].startswith('train') and text.splitlines()[3].startswith('eval')
  return results


@needs_libtpu
def test_benchmark_compiles_for_a_tpu_slice_this_machine_lacks(tmp_path, monkeypatch):
  results = _compiled_for(tmp_path, monkeypatch, 'v5e:2x2')
  tpu = results['compiled_for']
  assert (tpu['target'], tpu['platform'], tpu['device'], tpu['num_devices'],
          tpu['memory_bytes']) == ('v5e:2x2', 'tpu', 'TPU v5 lite', 4, 16e9)
  assert 'autotuned' not in tpu['train']
  assert 'compiled for v5e:2x2 (4 x TPU v5 lite, 16 GB each) on this machine' in (
      table.format_table(results))


# JAX's CUDA plugin (the test extra, on Linux x86-64) describes GPUs without them.
needs_cuda_plugin = pytest.mark.skipif(
    not runtime.cuda_plugins(),
    reason="needs JAX's CUDA plugin: pip install 'jax[cuda13-local]'")


@needs_cuda_plugin
def test_benchmark_compiles_for_a_gpu_this_machine_lacks(tmp_path, monkeypatch):
  results = _compiled_for(tmp_path, monkeypatch, 'h100')
  gpu = results['compiled_for']
  # JAX's allocator takes 75% of the card's memory, as nvidia-smi gives it.
  assert (gpu['target'], gpu['platform'], gpu['device'], gpu['num_devices'],
          gpu['memory_bytes']) == ('h100', 'gpu', 'NVIDIA H100 80GB HBM3', 1,
                                   int(0.75 * 81559 * 2**20))
  # Every convolution lowered for a GPU is one cuDNN call XLA would autotune, every 1x1 one a
  # cuBLAS matrix product (as train.py sets XLA up on a GPU), none a Triton GEMM.
  config = tiny_config('unused', batch_size=8)
  lowered = benchmark_lib.lowered_op_counts(config, ('cuda',))
  pointwise = sum(isinstance(node, nnx.Conv) and node.kernel_size == (1, 1)
                  for _, node in nnx.iter_graph(models.create_model(config.model)))
  for name in ('train', 'eval'):
    tuned = results['compiled_for'][name]['autotuned']
    assert tuned['cudnn_convolutions'] == lowered[name]['cuda']['convolutions'], (name, tuned)
    assert 0 < tuned['distinct_cudnn_convolutions'] <= lowered[name]['cuda'][
        'distinct_convolutions']
    assert tuned['cublas_gemms'] >= pointwise and tuned['distinct_cublas_gemms'] > 0
    assert tuned['triton_fusions'] <= 1, tuned  # Not the GEMMs.
    # Every cuDNN and cuBLAS call is a launch; the train step holds more kernels than eval.
    launches = results['compiled_for'][name]['kernel_launches']
    assert launches['custom_calls'] >= tuned['cudnn_convolutions'] + tuned['cublas_gemms']
    assert launches['fusions'] > 0
    # XLA records runs of them into command buffers (the card's driver lets it trace library
    # calls too), but its default set leaves the convolutions out: each is submitted alone.
    graphs = results['compiled_for'][name]['command_buffers']
    assert graphs['submissions'] == graphs['command_buffers'] + sum(graphs['outside'].values())
    assert graphs['submissions'] < launches['total'] and graphs['in_command_buffers'] > 0
    assert graphs['outside']['kConvolution'] == tuned['cudnn_convolutions'], graphs
    # The target names the card's driver, so XLA records the cuBLAS calls as it would there
    # (without one it would leave every GEMM outside).
    gemms_outside = graphs['outside'].get('kCublasLtMatmul', 0) + graphs['outside'].get('kGemm', 0)
    assert gemms_outside < tuned['cublas_gemms'], graphs
  assert (results['compiled_for']['train']['kernel_launches']['total']
          > results['compiled_for']['eval']['kernel_launches']['total'])
  text = table.format_table(results)
  assert ('compiled for h100 (1 x NVIDIA H100 80GB HBM3, 64 GB each: JAX\'s share of the card) '
          'on this machine') in text and 'GPU autotuning off' in text
  assert 'train autotuned on a GPU: ' in text
  assert 'train kernels launched per run: ' in text
  assert 'train submitted per run: ' in text


@needs_cuda_plugin
def test_benchmark_compiles_for_several_gpus_this_machine_lacks(tmp_path, monkeypatch):
  results = _compiled_for(tmp_path, monkeypatch, 'h100:2')
  gpus = results['compiled_for']
  assert (gpus['target'], gpus['num_devices']) == ('h100:2', 2)
  # The batch split over the two: BatchNorm's statistics and the gradients summed over both.
  assert gpus['train']['collectives']['all-reduce'] > 0
  assert ('train collectives between the devices: '
          f'{gpus["train"]["collectives"]["all-reduce"]} all-reduce') in (
              table.format_table(results))


@needs_cuda_plugin
def test_several_gpus_are_named_by_their_count_after_the_card():
  target = compile_targets.devices_not_here('h200:2x4')  # Two hosts of four.
  assert len(target.devices) == 8 and {d.device_kind for d in target.devices} == {'NVIDIA H200'}
  assert sorted({d.process_index for d in target.devices}) == [0, 1]
  assert len(compile_targets.devices_not_here('H100:8').devices) == 8
  with pytest.raises(ValueError, match=r"'h100:0' names no GPU"):
    compile_targets.devices_not_here('h100:0')


@needs_cuda_plugin
def test_a_gpu_is_named_by_a_known_card_or_a_file_of_xla_s_description(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"No GPU or TPU slice named 'a100'.*\['h100', 'h200'\]"):
    compile_targets.devices_not_here('a100')
  # Another card: its description in a file, memory share as the user sets it.
  card = tmp_path / 'small.pbtxt'
  card.write_text(open(os.path.join(compile_targets.GPU_TARGETS_DIR, 'h200.pbtxt')).read().replace(
      'device_memory_size: 150754820096', 'device_memory_size: 1000000000'))
  monkeypatch.setenv('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.5')
  target = compile_targets.devices_not_here(str(card))
  assert (target.target, target.memory_bytes) == (str(card), 500_000_000)
  assert [d.device_kind for d in target.devices] == ['NVIDIA H200']
  card.write_text('gpu_device_info { no_such_field: 1 }')
  with pytest.raises(ValueError, match="could not describe the GPU .*GpuTargetConfigProto"):
    compile_targets.devices_not_here(str(card))


def test_compiling_for_a_gpu_without_jax_s_cuda_plugin_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(runtime, 'pjrt_plugins', set)
  with pytest.raises(ValueError, match=r"needs JAX's CUDA plugin.*jax\[cuda13-local\]"):
    compile_targets.devices_not_here('h100')


@needs_libtpu
def test_largest_batches_for_chips_not_here_are_those_the_tpu_compiler_accepts(tiny_data_dir,
                                                                              monkeypatch):
  target = compile_targets.devices_not_here('v5e:2x2')
  devices = target.devices
  # XLA's TPU compiler knows the chip's memory and refuses a program larger: a batch fits
  # where its step compiles.
  mesh = jax.make_mesh((4,), ('data',), devices=devices)
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  double = jax.jit(lambda x: 2 * x, out_shardings=split)
  with pytest.raises(jax.errors.JaxRuntimeError, match='RESOURCE_EXHAUSTED'):
    double.lower(jax.ShapeDtypeStruct((4 * 3 * 2**30,), jnp.float32, sharding=split)).compile()

  # The search on such a compiler's answers (a real one takes ~20 s a program here): 1 MiB per
  # chip and 1 MiB per image on it, refused above 40 MiB.
  compiled = []
  limit_mib = 40

  def compile_(lowered, **unused_kwargs):
    batch = lowered.args_info[0][1]['image'].shape[0]
    assert 'mhlo.num_partitions = 4' in lowered.as_text()  # Split over the slice's chips.
    compiled.append(batch)
    per_chip = (1 + batch // 4) * 2**20
    if per_chip > limit_mib * 2**20:
      raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Ran out of memory on HBM')
    return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
        argument_size_in_bytes=per_chip, output_size_in_bytes=0, temp_size_in_bytes=0,
        alias_size_in_bytes=0))

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_)
  made = []
  random_batch = batches.random_batch
  monkeypatch.setattr(batches, 'random_batch',
                      lambda config: made.append(config.batch_size) or random_batch(config))
  monkeypatch.setattr(train_lib.Trainer, 'initial_state', None)  # Nothing runs.
  progress = []
  results = largest_batch.largest_batches(
      {'plain': tiny_config(tiny_data_dir)}, memory_bytes=48 << 20, target=target,
      on_progress=lambda found: progress.append(copy.deepcopy(found)))
  # Per chip 2 MiB at batch 4, 5 MiB at 16: 0.25 MiB per image of the global batch over 1 MiB;
  # 48 MiB holds 188, refused; then 10% less, 168, refused; then 148, which fits; then halfway
  # to the refusal, 156, the largest (40 MiB on a chip).
  assert results == {'plain': {
      'memory_bytes': 48 << 20, 'bytes_per_image': 2**18, 'estimate': 188,
      'tried': [[188, False, None], [168, False, None], [148, True, 38 * 2**20],
                [156, True, 40 * 2**20]], 'batch_size': 156,
      'smallest_refused': 168, 'search_ended': False, 'checked': 'compiled for devices not here'}}
  assert compiled == [4, 16, 188, 168, 148, 156]
  # After each try what was found so far (the benchmark writes it to its JSON: a run stopped at
  # a time limit keeps it).
  assert [(p['plain']['batch_size'], p['plain'].get('why')) for p in progress] == [
      (None, 'none fitted yet'), (None, 'none fitted yet'), (148, None), (156, None)]
  assert progress[-1] == results
  assert set(made) == {1}  # Batch shapes from one image's: no batch of thousands made.
  assert table._lowered_and_largest_rows({'largest_batch': results}) == [
      'largest batch (plain): 156 (compiled for devices not here; 168 did not fit)']

  # Where the estimate is far out, four tries 10% apart may all be refused: none found.
  limit_mib = 20
  results = largest_batch.largest_batches({'plain': tiny_config(tiny_data_dir)},
                                          memory_bytes=48 << 20, target=target)
  assert [fit for _, fit, _ in results['plain']['tried']] == [False] * 4
  assert table._lowered_and_largest_rows({'largest_batch': results}) == [
      'largest batch (plain): None (no batch from 188 down fitted)']


@needs_cuda_plugin
def test_largest_batches_for_a_gpu_not_here_are_those_whose_buffers_fit_its_memory(
    tiny_data_dir, monkeypatch):
  """XLA's GPU compiler, unlike the TPU's, compiles a program larger than the card: a batch
  fits where XLA's buffers fit the memory."""
  target = compile_targets.devices_not_here('h100')
  compiled = []

  def compile_(lowered, compiler_options):
    # As train.py on a GPU: matrix products on cuBLAS; and no autotuning without the card.
    assert compiler_options == {'xla_gpu_autotune_level': 0, 'xla_gpu_enable_triton_gemm': False}
    batch = lowered.args_info[0][1]['image'].shape[0]
    compiled.append(batch)
    used = (1 + batch + max(0, batch - 32)) * 2**20  # 1 MiB per image, 2 from 32 on.
    return types.SimpleNamespace(memory_analysis=lambda: types.SimpleNamespace(
        argument_size_in_bytes=used, output_size_in_bytes=0, temp_size_in_bytes=0,
        alias_size_in_bytes=0))

  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_)
  monkeypatch.setattr(train_lib.Trainer, 'initial_state', None)  # Nothing runs.
  results = largest_batch.largest_batches({'plain': tiny_config(tiny_data_dir)},
                                          memory_bytes=48 << 20, target=target)
  # 1 MiB per image from batches 1 and 4 puts 47 images in 48 MiB; they take 63 MiB, refused;
  # the line through 4 (5 MiB) and 47 aimed at 95% of 48 MiB gives 34, which fits (37 MiB);
  # halfway up, 40 (49 MiB) is refused and 37 (43 MiB) fits.
  assert results['plain']['tried'] == [[47, False, 63 << 20], [34, True, 37 << 20],
                                       [40, False, 49 << 20], [37, True, 43 << 20]]
  assert compiled == [1, 4, 47, 34, 40, 37]
  assert (results['plain']['batch_size'], results['plain']['smallest_refused']) == (37, 40)


@needs_libtpu
def test_a_tpu_slice_libtpu_does_not_know_is_named_with_the_form_it_takes():
  with pytest.raises(ValueError, match=r"'v5x:9'.*name one as 'v5e:2x2'"):
    compile_targets.devices_not_here('v5x:9')


def test_compiling_for_a_tpu_slice_without_libtpu_says_how_to_install_it(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'libtpu' else find_spec(name, *args))
  with pytest.raises(ValueError, match=r"needs libtpu.*pip install -e '\.\[tpu\]'"):
    compile_targets.devices_not_here('v5e:2x2')


def test_compile_for_with_flags_that_run_stops_at_once(tmp_path):
  run = subprocess.run(
      [sys.executable, '-m', 'hded_jax.benchmark', '--config=configs/smoke.py',
       '--compile_for=v5e:2x2', '--rendering'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode != 0
  assert '--compile_for compiles for devices that are not here and runs nothing' in run.stderr


def test_flops_are_counted_where_the_backend_does_not_analyse_lowered_programs(monkeypatch):
  """As on a GPU behind JAX's CUDA plugin, whose lowered programs have no cost analysis."""
  lowered = jax.jit(lambda x: jnp.sum(x @ x)).lower(jnp.ones((64, 64)))
  flops = measure.program_flops(lowered)
  assert flops > 2 * 64**3
  monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', lambda self: None)
  assert measure.program_flops(lowered) == flops

  def refuse(self):  # As jax 0.12 does for a TPU slice described without its chips.
    raise jax.errors.JaxRuntimeError('This operation is implemented for a PjRt-compatible '
                                     'backend only.')

  monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', refuse)
  assert measure.program_flops(lowered) == flops


def test_compile_profile_lists_xla_phases_and_a_failing_profiler_costs_only_the_trace(
    tmp_path, monkeypatch):
  step = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  _, figures = measure.timed_compile('step', step, jnp.ones((8, 8)), profile_dir=str(tmp_path))
  phases = traces.compile_phase_times(traces.newest_trace(str(tmp_path)))
  assert figures['compile_s'] > 0 and any('Compiler' in p['name'] for p in phases), phases
  assert all(not p['name'].startswith('$') for p in phases)  # XLA's events, not Python's.

  def no_profiler(*args, **kwargs):
    raise RuntimeError('no CUPTI')

  monkeypatch.setattr(jax.profiler, 'start_trace', no_profiler)
  compiled, figures = measure.timed_compile('step', step, jnp.ones((4, 4)),
                                             profile_dir=str(tmp_path / 'none'))
  assert figures['compile_s'] > 0 and float(compiled(jnp.ones((4, 4)))) > 0


def test_device_op_times_come_from_the_device_lines_with_events(tmp_path):
  """libtpu, where installed, may add an empty '/device:CUSTOM:...' process to a CPU trace: the
  ops are then those of XLA's CPU threads; a GPU's come from its own processes."""
  def trace(*events):
    path = tmp_path / 'trace.json.gz'
    with gzip.open(path, 'wt') as f:
      json.dump({'traceEvents': list(events)}, f)
    return str(path)

  meta = lambda kind, pid, name, tid=0: {'ph': 'M', 'name': f'{kind}_name', 'pid': pid,
                                         'tid': tid, 'args': {'name': name}}
  op = lambda pid, tid, name, dur: {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name, 'dur': dur}
  cpu = [meta('process', 1, '/device:CUSTOM:Megascale Trace'), meta('process', 7, '/host:CPU'),
         meta('thread', 7, 'tf_XLAEigen/1', tid=3), meta('thread', 7, 'main', tid=4),
         op(7, 3, 'fusion.1', 3000), op(7, 3, 'convolution.2', 6000), op(7, 4, 'python', 9000)]
  times = traces.device_op_times(trace(*cpu), steps=3)
  assert times['busy_ms_per_step'] == {'XLA CPU threads': 3.0}
  assert [o['name'] for o in times['top_ops']] == ['convolution.2', 'fusion.1']
  gpu = [*cpu, meta('process', 2, '/device:GPU:0'), meta('thread', 2, 'Stream #1', tid=5),
         op(2, 5, 'gemm', 1500)]
  times = traces.device_op_times(trace(*gpu), steps=3)
  assert times['top_ops'] == [{'line': '/device:GPU:0 Stream #1', 'name': 'gemm',
                               'ms_per_step': 0.5, 'calls_per_step': 1 / 3}]


def test_the_wait_for_a_quiet_machine_is_said(monkeypatch, caplog):
  """Minutes can pass before a measurement on a busy machine: the log says why, and how not to."""
  loads = iter([3.0, 2.0, 0.1])
  monkeypatch.setattr(measure, 'machine_load', lambda: {'other_busy_cores': next(loads)})
  monkeypatch.setattr(measure.time, 'sleep', lambda seconds: None)
  caplog.set_level('INFO', logger='absl')
  assert measure.wait_for_quiet(0.5, 60)['other_busy_cores'] == 0.1
  assert ('Other processes keep 3.0 cores busy: waiting up to 60 s for at most 0.5 before timing '
          '(--max_wait=0 times at once).') in caplog.text
