"""benchmarks/gpu.sh rehearsed on the CPU with the tiny model: the default check and the
experiments run, in the order asked, and their figures and exit codes are merged into one
results.json. The experiments that differ only in the benchmark's arguments are checked for
those arguments, without running them."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _gpu_script(out, data_dir=None, **env):
  """Runs benchmarks/gpu.sh with the tiny model into ``out``: its results, log and exit code."""
  env = {**os.environ, 'OUT': str(out), 'CONFIG': 'configs/smoke.py', 'BIG_BATCH': '8',
         'SMALL_BATCH': '4', 'BUDGET_S': '600',
         **({'TFDS_DATA_DIR': data_dir} if data_dir else {}), **env}
  run = subprocess.run(['bash', 'benchmarks/gpu.sh'], cwd=REPO, env=env, capture_output=True,
                       text=True)
  results = out / 'results.json'
  return (json.loads(results.read_text()) if results.exists() else None,
          (out / 'log.txt').read_text() if (out / 'log.txt').exists() else '',
          run)


def _benchmark_stand_in(tmp_path, output: str) -> str:
  """A PATH whose python3 writes ``output`` (a Python expression) as the benchmark's JSON output
  instead of running it, and runs everything else."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'python3').write_text(f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] == ['-m', 'hded_jax.benchmark']:
  path = next(a for a in sys.argv if a.startswith('--output=')).split('=', 1)[1]
  with open(path, 'w') as f:
    f.write({output})
else:
  os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
""")
  (bin_dir / 'python3').chmod(0o755)
  return f"{bin_dir}:{os.environ['PATH']}"


def _ran(results):
  return {name for name, r in results.items() if r['status']['exit'] == '0'}


def test_gpu_script_default_check(tiny_data_dir, tmp_path):
  """What `bash benchmarks/gpu.sh` runs unchanged: the check (the benchmark matrix, train.py
  and eval.py), then the comparisons with PyTorch."""
  pytest.importorskip('torch')  # The comparisons time PyTorch beside JAX.
  # PyTorch's TF32 and bf16 modes are CUDA's; the CPU has float32.
  results, log, run = _gpu_script(tmp_path / 'out', tiny_data_dir, TORCH_B32_MODES='float32',
                                  TORCH_F32_MODES='float32')
  assert run.returncode == 0, run.stderr[-3000:]
  check = ['platform', 'bf16_b32', 'f32_b4', 'smoke_train', 'smoke_eval', 'bf16_b4', 'largest']
  assert _ran(results) == set(results) == {*check, 'torch_b32', 'torch_f32', 'f32_full_b4'}, (
      log[-3000:])
  # Progress as it goes: each step's start and end on stdout.
  assert '== bf16_b32 (limit ' in run.stdout and '== bf16_b32: exit 0 after ' in run.stdout
  assert f"7 of 7 ran: {' '.join(check)})" in run.stdout
  assert log.index('== largest') < log.index('== torch_b32')
  cold = results['bf16_b32']
  assert cold['config']['dtype'] == 'bfloat16' and cold['jax']['train']['images_per_s'] > 0
  assert results['f32_b4']['config']['dtype'] == 'float32'
  assert 'torch' not in cold and 'torch' not in results['f32_b4']
  # Each comparison times PyTorch beside the check's programs, read back from their cache.
  for name, compared in (('torch_b32', cold), ('torch_f32', results['f32_b4'])):
    assert results[name]['config'] == compared['config']
    assert 'train_vs_float32' in results[name]['jax_vs_torch']
    for program in ('train', 'eval'):
      assert (results[name]['jax'][program]['compile_s']
              < compared['jax'][program]['compile_s'] / 3)
  # Full float32 products against PyTorch with TF32 off, like for like.
  full = results['f32_full_b4']
  assert full['config']['model']['matmul_precision'] == 'float32'
  assert full['jax']['products_in'] == 'float32' and 'train_vs_float32' in full['jax_vs_torch']
  assert results['bf16_b4']['config']['batch_size'] == 4
  assert results['smoke_eval']['step'] == 20 and 'depth/rmse' in results['smoke_eval']
  # The CPU reports no memory limit: the step runs, and says why it found no batch.
  assert set(results['largest']['largest_batch']) == {'plain', 'remat'}
  assert 'no memory limit' in results['largest']['largest_batch']['plain']['why']


def test_gpu_script_experiments_in_the_order_asked(tiny_data_dir, tmp_path):
  results, log, run = _gpu_script(
      tmp_path / 'out', tiny_data_dir, RESTART_MODEL='--config.batch_size=4', PIPELINE_WORKERS='1',
      ONLY='transpose_b32 bf16_b32 restart train_restart max_solutions pipeline')
  assert run.returncode == 0, run.stderr[-3000:]
  assert _ran(results) == set(results) == {
      'bf16_b32', 'restart', 'train_restart', 'max_solutions', 'pipeline', 'transpose_b32'}, (
      log[-3000:])
  assert log.index('== transpose_b32') < log.index('== bf16_b32') < log.index('== restart')
  cold, restart = results['bf16_b32'], results['restart']
  assert results['transpose_b32']['config']['model']['up_conv'] == 'transpose'
  # XLA flags reach the benchmark (the other experiments' arguments: the test below).
  assert ('--xla_gpu_autotune_max_solutions=1' in
          results['max_solutions']['machine']['xla_flags'])
  assert results['max_solutions']['jax']['train']['images_per_s'] > 0
  # A profiled cold compile: XLA's phases by time (on the CPU, its CPU compiler's).
  phases = results['transpose_b32']['jax']['compile_profile']
  assert any('Compiler' in phase['name'] for phase in phases), phases[:10]
  # The restart loads the programs that the cold run left in the cache, and is profiled.
  for program in ('train', 'eval'):
    assert restart['jax'][program]['compile_s'] < cold['jax'][program]['compile_s'] / 3
  assert 0 < restart['jax']['first_step_after_process_start_s'] < 600
  assert restart['jax']['profile']['top_ops']
  assert (tmp_path / 'out' / 'train_step.hlo.txt.gz').exists()
  assert (tmp_path / 'out' / 'perfetto_trace.json.gz').exists()
  # train.py started cold, then resumed in the same workdir: each one's first step timed.
  restarts = results['train_restart']
  assert 0 < restarts['restart_first_step_s'] < restarts['cold_first_step_s'] < 600, restarts
  assert {'restoring the checkpoint', 'finding the step in the program cache'} <= set(
      restarts['restart_parts_s']), restarts
  assert list(restarts['restart_beside_s']) == ['loaded the step from the program cache']
  assert 'drawing the initial state' in restarts['cold_parts_s'], restarts
  assert list(restarts['cold_beside_s']) == ['XLA compiled the step or read it from the cache']
  # The input pipeline alone, with threads and with worker processes.
  pipelines = {k: v for k, v in results['pipeline'].items() if k.startswith('workers_')}
  assert {k: p['num_workers'] for k, p in pipelines.items()} == {'workers_0': 0, 'workers_1': 1}
  assert all(p['examples_per_s'] > 0 for p in pipelines.values())


def test_gpu_script_experiments_pass_their_settings_to_the_benchmark(tmp_path):
  """Each experiment the default leaves out, by the arguments and XLA flags it gives the
  benchmark (recorded instead of run: the tests above run the benchmark with such ones)."""
  # The benchmark's arguments and XLA flags, recorded as its output.
  path = _benchmark_stand_in(tmp_path, "json.dumps({'argv': sys.argv[3:], "
                                       "'xla_flags': os.environ.get('XLA_FLAGS', '').split()})")
  experiments = {
      'profiled_b32': ['--compile_profile_dir='],
      'transpose_b32': ['--config.model.up_conv=transpose', '--compile_profile_dir='],
      'strided_b32': ['--config.model.up_conv=transpose_strided_grads', '--compile_profile_dir='],
      'autotune': ['--compile_profile_dir=', '--xla_gpu_autotune_level=0'],
      'max_solutions': ['--xla_gpu_autotune_max_solutions=1'],
      'flat_b32': ['--config.optimizer.flatten=True'],
      'graphs_b32': ['--xla_gpu_enable_command_buffer=+CONVOLUTION'],
      'channels_b32': ['--config.model.up_conv=phase_channels'],
      'overrides_b32': ['--config.model.up_conv=phase_channels',
                        '--config.optimizer.flatten=True'],
      'scan_b32': ['--config.model.dense_block=scan'],
      'rendering': ['--rendering', '--batch_size=4'],
  }
  results, log, run = _gpu_script(
      tmp_path / 'out', PATH=path, AUTOTUNE_LEVEL='0',
      B32_OVERRIDES='--config.model.up_conv=phase_channels --config.optimizer.flatten=True',
      ONLY=' '.join(experiments))
  assert run.returncode == 0, run.stderr[-3000:]
  assert _ran(results) == set(results) == set(experiments), log[-3000:]
  for name, expected in experiments.items():
    given = [*results[name]['argv'], *results[name]['xla_flags']]
    missing = [e for e in expected if not any(g.startswith(e) for g in given)]
    assert not missing, (name, missing, given)
    if name.endswith('_b32') or name in ('autotune', 'max_solutions'):
      # Each a cold bf16 batch-32 compile (BIG_BATCH), as bf16_b32 is, with nothing cached.
      assert {'--dtype=bfloat16', '--batch_size=8'} <= set(given), (name, given)
      assert not any(g.startswith('--cache_dir') for g in given), (name, given)
  assert not any('--config.' in g for g in results['profiled_b32']['argv']), results


def test_gpu_script_unknown_step_and_spent_budget(tmp_path):
  results, log, run = _gpu_script(tmp_path / 'unknown', ONLY='platform bf16_b23')
  assert run.returncode == 2 and "no step 'bf16_b23'" in run.stderr
  assert results is None and not (tmp_path / 'unknown').exists()
  # A step that would start with under 20 s of the budget left is recorded as skipped.
  results, log, run = _gpu_script(tmp_path / 'late', ONLY='platform', BUDGET_S='5')
  assert run.returncode == 0, run.stderr
  assert results == {'platform': {'status': {'exit': 'skipped', 'seconds': 0}}}
  assert '== platform: skipped' in log and '== platform: skipped' in run.stdout


def test_a_step_cut_off_as_it_wrote_is_reported_beside_the_others(tmp_path):
  path = _benchmark_stand_in(tmp_path, "'{\"jax\": {\"train\": '")  # Stopped mid-write.
  results, log, run = _gpu_script(tmp_path / 'out', PATH=path, ONLY='platform bf16_b32')
  assert run.returncode == 0, run.stderr[-3000:]
  assert results['platform']['status']['exit'] == '0' and results['platform']['jax']
  assert results['bf16_b32']['status']['exit'] == '0'
  assert 'unreadable_output' in results['bf16_b32'], results
  assert not [name for name in os.listdir(tmp_path / 'out') if name.endswith('.tmp')]
