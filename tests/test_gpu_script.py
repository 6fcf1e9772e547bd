"""benchmarks/gpu.sh rehearsed on the CPU with the tiny model: steps run, are skipped when not
asked for, and their figures and exit codes are merged into one results.json."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO


def test_gpu_script_runs_the_named_steps_and_merges_their_results(tiny_data_dir, tmp_path):
  pytest.importorskip('torch')  # The restart step times PyTorch beside JAX.
  env = dict(os.environ, OUT=str(tmp_path / 'out'), CONFIG='configs/smoke.py', BIG_BATCH='8',
             SMALL_BATCH='4', BUDGET_S='600', TFDS_DATA_DIR=tiny_data_dir,
             TORCH_B32_MODES='float32', RESTART_MODEL='--config.batch_size=4', PIPELINE_WORKERS='1',
             ONLY='platform bf16_b32 restart train_restart max_solutions flat_b32 pipeline '
                  'smoke_train smoke_eval f32_full_b4 transpose_b32')
  subprocess.run(['bash', 'benchmarks/gpu.sh'], cwd=REPO, env=env, check=True,
                 capture_output=True)
  results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  log = (tmp_path / 'out' / 'log.txt').read_text()
  ran = {name for name, r in results.items() if r['status']['exit'] == '0'}
  assert ran == {'platform', 'bf16_b32', 'restart', 'train_restart', 'max_solutions',
                 'flat_b32', 'pipeline', 'smoke_train', 'smoke_eval', 'f32_full_b4',
                 'transpose_b32'}, log[-3000:]
  assert {name for name, r in results.items() if r['status']['exit'] == 'skipped'} == {
      'strided_b32', 'bf16_b4', 'scan_b32', 'f32_b4', 'rendering', 'largest', 'autotune'}
  cold, restart = results['bf16_b32'], results['restart']
  assert cold['config']['dtype'] == 'bfloat16' and cold['jax']['train']['images_per_s'] > 0
  assert results['transpose_b32']['config']['model']['up_conv'] == 'transpose'
  assert ('--xla_gpu_autotune_max_solutions=8' in
          results['max_solutions']['machine']['xla_flags'])
  assert results['max_solutions']['jax']['train']['images_per_s'] > 0
  assert results['flat_b32']['config']['optimizer']['flatten'] is True
  # Full float32 products against PyTorch with TF32 off, like for like.
  full = results['f32_full_b4']
  assert full['config']['model']['matmul_precision'] == 'float32'
  assert full['jax']['products_in'] == 'float32' and 'train_vs_float32' in full['jax_vs_torch']
  # Each cold compile is profiled: XLA's phases by time (on the CPU, its CPU compiler's).
  for name in ('bf16_b32', 'transpose_b32'):
    phases = results[name]['jax']['compile_profile']
    assert any('Compiler' in phase['name'] for phase in phases), phases[:10]
  # The restart loads the programs that the cold run left in the cache, is profiled and
  # compared with PyTorch.
  for program in ('train', 'eval'):
    assert restart['jax'][program]['compile_s'] < cold['jax'][program]['compile_s'] / 3
  assert 0 < restart['jax']['first_step_after_process_start_s'] < 600
  assert restart['jax']['profile']['top_ops'] and 'train_vs_float32' in restart['jax_vs_torch']
  assert (tmp_path / 'out' / 'train_step.hlo.txt.gz').exists()
  assert (tmp_path / 'out' / 'perfetto_trace.json.gz').exists()
  assert results['smoke_eval']['step'] == 20 and 'depth/rmse' in results['smoke_eval']
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
