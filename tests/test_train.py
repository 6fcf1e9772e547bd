"""Training and evaluation end to end on the tiny synthetic dataset and model."""

from concurrent import futures
import functools
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf
from clu import periodic_actions
from flax import nnx

from hded_jax import checkpoints
from hded_jax import defocus
from hded_jax import eval_lib
from hded_jax import input_pipeline
from hded_jax import metrics
from hded_jax import models
from hded_jax import program_cache
from hded_jax import sharding
from hded_jax import train_lib
from hded_jax.benchmarking import batches
from tests.conftest import copy_run
from tests.conftest import REPO
from tests.conftest import tiny_config


def params_of(state):
  return jax.tree.map(np.asarray, nnx.merge_state(state.params, state.batch_stats)
                      .to_pure_dict())


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def steps_in(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def train_step_compiles(caplog) -> list[str]:
  """The threads on which XLA compiled the train step (or read it from JAX's compilation
  cache) since ``caplog`` started listening (JAX logs each compile at DEBUG; an earlier test's
  background thread may still log one)."""
  return [r.threadName for r in caplog.records
          if 'XLA compilation of jit(train_step)' in r.getMessage()]


def startup_parts(caplog, step: int) -> dict[str, float]:
  """The parts of the start-up that the latest log line of ``step``, a run's first, names;
  checks that they add up to the seconds since the process started."""
  line = [r.getMessage() for r in caplog.records
          if r.getMessage().startswith(f'Step {step} done ')][-1]
  total, parts = re.fullmatch(r'Step \d+ done ([0-9.]+) s after the process started: (.*)\; '
                              r'(?:XLA compiled|loaded) .* in [0-9.]+ s beside them\.',
                              line).groups()
  parts = {what: float(s) for what, s in re.findall(r'([a-zA-Z ,()-]+?) ([0-9.]+) s(?:, |$)',
                                                     parts)}
  assert abs(sum(parts.values()) - float(total)) < 0.1 * len(parts), line
  return parts


def test_resume_continues_exactly_where_it_stopped(tiny_data_dir, tmp_path, caplog,
                                                  monkeypatch, own_program_cache):
  """An interrupted run, rerun with the same command, ends where an uninterrupted one does:
  the step count, optimizer state, dropout keys and data order all continue.

  Also: a new run compiles its step once, in the background (for the batch the pipeline
  gives), and keeps it in the program cache; the resumed run draws no initial weights and
  neither traces nor compiles its step: it loads it from there while the checkpoint
  restores. Each run's first step says where the seconds since the process started went."""
  caplog.set_level('INFO', logger='absl')
  caplog.set_level('DEBUG', logger='jax._src.dispatch')  # Last: the capturing handler's level.
  initial_states = []
  initial_state = train_lib.Trainer.initial_state
  monkeypatch.setattr(train_lib.Trainer, 'initial_state',
                      lambda trainer: initial_states.append(1) or initial_state(trainer))
  straight = train_lib.train(
      tiny_config(tiny_data_dir, num_train_steps=6), str(tmp_path / 'straight'))
  assert int(straight.step) == 6
  compiles = train_step_compiles(caplog)
  assert compiles and all(name.startswith('compile_train_step') for name in compiles), compiles
  assert len(os.listdir(own_program_cache)) == 1

  resumed_dir = str(tmp_path / 'resumed')
  first = train_lib.train(tiny_config(tiny_data_dir, num_train_steps=3),
                                       resumed_dir)
  assert int(first.step) == 3 and steps_in(resumed_dir) == [2, 3]
  assert len(initial_states) == 2
  assert 'drawing the initial state' in startup_parts(caplog, 1)
  caplog.clear()
  resumed = train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6),
                                         resumed_dir)
  assert len(initial_states) == 2
  assert not train_step_compiles(caplog)
  parts = startup_parts(caplog, 4)
  assert list(parts) == ['imports and set-up',
                         'the dataset (built if missing), model and checkpoint config',
                         'finding the step in the program cache', 'restoring the checkpoint',
                         'the metric writer (importing TensorFlow)', 'waiting for XLA',
                         'the first batch and step'], parts
  assert int(resumed.step) == 6 and steps_in(resumed_dir) == [3, 4, 6]  # keeps 3
  assert_trees_equal(params_of(straight), params_of(resumed))


def test_a_kept_step_that_fails_to_run_is_removed_and_the_rerun_compiles(
    tiny_data_dir, tiny_run, tmp_path, monkeypatch, own_program_cache):
  """A program that loads but fails at its first run (as one that XLA did not serialise whole
  does): the error names the removed file and says to rerun; the rerun compiles and resumes."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  train_lib.train(tiny_config(tiny_data_dir, num_train_steps=5), workdir)
  assert len(os.listdir(own_program_cache)) == 1

  def out_of_memory(state, batch):
    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 9 bytes.')

  # Too little memory (an eval.py beside it): said so, and the kept program stays.
  monkeypatch.setattr(program_cache.CachedProgram, 'load', lambda self: out_of_memory)
  with pytest.raises(MemoryError, match='does not fit in device memory at config.batch_size=4 '
                     r'\(RESOURCE_EXHAUSTED: .*\). Lower the batch'):
    train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6), workdir)
  assert len(os.listdir(own_program_cache)) == 1

  def fails(state, batch):
    raise jax.errors.JaxRuntimeError('INTERNAL: Function add_select_fusion.1 not found')

  monkeypatch.setattr(program_cache.CachedProgram, 'load', lambda self: fails)
  with pytest.raises(RuntimeError, match='loaded from the program cache failed to run') as info:
    train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6), workdir)
  assert 'rerun the same command' in str(info.value) and not os.listdir(own_program_cache)
  monkeypatch.undo()
  assert int(train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6), workdir).step) == 6
  assert steps_in(workdir) == [4, 5, 6]


def test_the_wait_for_a_slow_compile_is_logged_until_it_ends(caplog):
  """A cold GPU compile of the full model takes over a minute with nothing else in the log:
  the wait says what it waits for and for how long, again every `log_every_s`."""
  caplog.set_level('INFO', logger='absl')
  clock = train_lib.StartupClock()
  with futures.ThreadPoolExecutor(1) as executor:
    compiling = executor.submit(lambda: time.sleep(0.5) or 'program')
    clock.time_compile(compiling, 'XLA compiled the step', "XLA's compile of the step")
    assert clock.wait_for_compile(log_every_s=0.1) == 'program'
  waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Waiting')]
  assert len(waits) >= 3, waits
  assert all(re.fullmatch(r"Waiting for XLA's compile of the step: \d+ s so far\.", w)
             for w in waits), waits
  assert re.search(r'XLA compiled the step in [0-9.]+ s beside them', clock.summary())
  caplog.clear()
  done = futures.Future()
  done.set_exception(RuntimeError('XLA ran out of memory'))
  clock.time_compile(done, 'XLA compiled the step', "XLA's compile of the step")
  with pytest.raises(RuntimeError, match='out of memory'):
    clock.wait_for_compile()
  assert not caplog.records  # Nothing to wait for.


def test_step_settings_leave_out_only_what_the_step_does_not_read(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  settings = train_lib.step_settings(config, train_size=8)
  loop_only = {'num_train_steps': 100, 'num_epochs': 7, 'log_every_steps': 5,
               'checkpoint_every_steps': 9, 'eval_batch_size': 2, 'init_from': 'checkpoint:x',
               'dataset.num_threads': 3, 'dataset.data_dir': '/elsewhere',
               'dataset.keep_resized_gb': 0.0, 'dataset.hflip': False,
               'dataset.color_jitter': 0.1, 'dataset.max_depth': 5.0,
               'dataset.eval_protocol': 'nyu_literature'}
  for field, value in loop_only.items():
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({field: value})
    assert train_lib.step_settings(changed, train_size=8) == settings, field
  in_the_step = {'optimizer.learning_rate': 1.0, 'batch_size': 8, 'seed': 7,
                 'model.dropout': 0.5, 'loss.depth_weight': 2.0, 'dataset.image_size': (64, 64)}
  for field, value in in_the_step.items():
    changed = config.copy_and_resolve_references()
    changed.update_from_flattened_dict({field: value})
    assert train_lib.step_settings(changed, train_size=8) != settings, field
  assert train_lib.step_settings(config, train_size=16) != settings  # The schedule's epochs.


def test_preemption_saves_and_exits_then_resumes(tiny_data_dir, tmp_path, monkeypatch):
  """Also: the profiler runs only when config.profile_steps asks for it."""
  workdir = str(tmp_path / 'run')
  config = tiny_config(tiny_data_dir, num_train_steps=6, checkpoint_every_steps=100)
  profilers = []
  monkeypatch.setattr(periodic_actions, 'Profile',
                      lambda **kwargs: profilers.append(kwargs) or (lambda step: None))
  monkeypatch.setattr(train_lib.PreemptionHandler, 'should_stop',
                      lambda self, step: step == 3)
  state = train_lib.train(config, workdir)
  assert int(state.step) == 3 and steps_in(workdir) == [3]
  assert not profilers
  monkeypatch.undo()
  monkeypatch.setattr(periodic_actions, 'Profile',
                      lambda **kwargs: profilers.append(kwargs) or (lambda step: None))
  state = train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6, checkpoint_every_steps=100,
                                      profile_steps=2), workdir)
  assert int(state.step) == 6 and steps_in(workdir) == [3, 6]
  assert profilers == [{'num_profile_steps': 2, 'logdir': workdir}]


def test_rerunning_a_finished_run_compiles_nothing_unless_its_final_step_fails(
    tiny_data_dir, tiny_run, tmp_path, monkeypatch, caplog):
  """The README's rerun resumes; a finished run's has nothing to train, and no compile to wait
  for (over a minute on a GPU). Its final step damaged, it resumes from step 2 and compiles."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  compile_step = train_lib.Trainer.compile_step_in_background
  compiled = []
  monkeypatch.setattr(train_lib.Trainer, 'compile_step_in_background',
                      lambda self, spec: compiled.append(spec) or compile_step(self, spec))
  with caplog.at_level(logging.INFO):
    state = train_lib.train(tiny_config(tiny_data_dir), workdir)
  assert int(state.step) == 4 and not compiled
  assert 'holds step 4, and the run has 4 steps: nothing to train' in caplog.text
  os.remove(os.path.join(workdir, 'checkpoints', '4', 'model', 'manifest.ocdbt'))
  state = train_lib.train(tiny_config(tiny_data_dir), workdir)
  assert int(state.step) == 4 and len(compiled) == 1


def test_global_norm_is_optax_s_in_one_reduction():
  tree = {'kernel': np.full((3, 3, 4, 8), 0.5, np.float32),
          'scale': np.arange(8.0, dtype=np.float32), 'bias': [np.ones(5, np.float32)]}
  np.testing.assert_allclose(train_lib.global_norm(tree), optax.global_norm(tree), rtol=1e-6)
  assert jax.jit(train_lib.global_norm).lower(tree).as_text().count('stablehlo.reduce') == 1


def test_sigterm_and_ctrl_c_set_the_stop_flag_and_handlers_are_restored():
  # With Python's own Ctrl-C handler before, whatever this process (a pytest-xdist worker) had.
  worker_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum, name in ((signal.SIGTERM, 'SIGTERM'), (signal.SIGINT, 'SIGINT')):
      handler = train_lib.PreemptionHandler()
      assert not handler.should_stop(1)
      signal.raise_signal(signum)
      assert handler.should_stop(2) and handler.received == name
      if signum == signal.SIGINT:  # A second Ctrl-C stops at once.
        with pytest.raises(KeyboardInterrupt):
          signal.raise_signal(signal.SIGINT)
      handler.close()
      assert {s: signal.getsignal(s) for s in previous} == previous
  finally:
    signal.signal(signal.SIGINT, worker_handler)


def test_with_several_processes_sigterm_is_left_to_jax_and_ctrl_c_passed_on_to_it(monkeypatch):
  """JAX's preemption service catches SIGTERM itself (tests/test_multidevice.py stops two
  processes that way); a Ctrl-C reaches it as a SIGTERM."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  forwarded = []
  service = lambda signum, frame: forwarded.append(signum)  # JAX's handler, as it would be.
  worker_handlers = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                     signal.SIGTERM: signal.signal(signal.SIGTERM, service)}
  try:
    handler = train_lib.PreemptionHandler()
    assert signal.getsignal(signal.SIGTERM) is service
    signal.raise_signal(signal.SIGINT)
    assert forwarded == [signal.SIGTERM] and handler.received == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):  # A second Ctrl-C stops at once.
      signal.raise_signal(signal.SIGINT)
    handler.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    for signum, worker_handler in worker_handlers.items():
      signal.signal(signum, worker_handler)


def test_ctrl_c_saves_and_exits_with_readable_logs(tiny_data_dir, tiny_run, compilation_cache,
                                                   tmp_path):
  """train.py as a person runs it, resuming a run whose newest step is damaged and stopped with
  Ctrl-C: the log shows the project's progress, one warning about the damaged step and no
  library chatter or tracebacks."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  os.remove(os.path.join(workdir, 'checkpoints', '4', 'model', 'manifest.ocdbt'))
  proc = subprocess.Popen(
      [sys.executable, 'train.py', '--config=configs/smoke.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={tiny_data_dir}', '--config.dataset.auto_prepare=False',
       '--config.num_train_steps=100000', '--config.checkpoint_every_steps=100000'],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu', HDED_JAX_CACHE_DIR=compilation_cache))
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if '] [4] grad_norm=' in line:
      proc.send_signal(signal.SIGINT)
      break
  out = ''.join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-5000:]
  stopped = int(re.search(r'Stopped by SIGINT: saved step (\d+), exiting', out).group(1))
  assert stopped >= 4 and stopped in steps_in(workdir)
  assert len(re.findall('does not restore', out)) == 1 and 'Resumed from' in out
  assert 'Traceback' not in out and 'Event loop is closed' not in out
  # INFO lines come from the project and clu's progress reports only (not Orbax, JAX, TFDS).
  ours = set(os.listdir(os.path.join(REPO, 'hded_jax'))) | {'train.py', 'logging_writer.py',
                                                             'local.py'}
  info_from = {m.group(1) for m in re.finditer(r'^I\d{4} [\d:.]+ +\d+ ([\w.]+\.py):\d+\]',
                                               out, re.M)}
  assert info_from <= ours, info_from - ours


def test_impossible_sizes_and_a_file_as_workdir_are_named(tiny_data_dir, tiny_run, tmp_path):
  for field, value in (('batch_size', 0), ('checkpoint_every_steps', 0), ('log_every_steps', -1)):
    with pytest.raises(ValueError, match=f'config.{field}={value}: must be at least 1'):
      train_lib.train(tiny_config(tiny_data_dir, **{field: value}), str(tmp_path / 'run'))
  with pytest.raises(ValueError, match='set one of them above 0'):
    train_lib.train(tiny_config(tiny_data_dir, num_train_steps=0, num_epochs=0),
                    str(tmp_path / 'run'))
  (tmp_path / 'file').write_text('x')
  with pytest.raises(NotADirectoryError, match=f'--workdir={tmp_path}/file is a file'):
    train_lib.train(tiny_config(tiny_data_dir), str(tmp_path / 'file'))
  assert not (tmp_path / 'run').exists()
  evaluated = copy_run(tiny_run, str(tmp_path / 'evaluated'))
  for field, value, problem in (('eval_batch_size', 0, 'must be at least 1'),
                                ('eval_num_examples', 0, r'-1 \(the whole split\) or at least 1'),
                                ('eval_num_images', -1, r'0 \(no images\) or more')):
    with pytest.raises(ValueError, match=f'config.{field}={value}: {problem}'):
      eval_lib.evaluate(tiny_config(tiny_data_dir, **{field: value}), evaluated, once=True,
                        timeout_secs=0)
  # No images is a setting, not a mistake.
  assert list(eval_lib.evaluate(tiny_config(tiny_data_dir, eval_num_images=0), evaluated,
                                once=True, timeout_secs=0)) == [4]


def test_non_finite_loss_stops_with_the_step_and_keeps_good_checkpoints(tiny_data_dir,
                                                                        tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny_config(tiny_data_dir, num_train_steps=20, checkpoint_every_steps=1)
  config.optimizer.learning_rate = 1e30
  with pytest.raises(train_lib.NonFiniteError, match=r'at step \d+') as info:
    train_lib.train(config, workdir)
  bad_step = int(re.search(r'at step (\d+)', str(info.value)).group(1))
  assert steps_in(workdir) and max(steps_in(workdir)) < bad_step


def test_eval_scores_checkpoints_and_keeps_the_best(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  # Follow mode: evaluates the newest checkpoint (step 4), the run's last step, and stops.
  results = eval_lib.evaluate(None, workdir, timeout_secs=5, poll_secs=0.1)
  assert list(results) == [4]
  with open(os.path.join(workdir, 'eval', 'metrics_4.json')) as f:
    figures = json.load(f)
  for key in ('depth/rmse', 'depth/abs_rel', 'depth/delta1', 'aif/psnr', 'aif/ssim',
              'input/psnr', 'input/ssim', 'baseline/mean_depth_rmse'):
    assert np.isfinite(figures[key]), key
  assert figures['num_images'] == 4 and figures['step'] == 4
  assert figures['protocol'] == 'authors' and 'input size' in figures['protocol_description']
  assert figures['defocused_input'] == 'stored'
  assert figures['camera'] == defocus.CAMERAS['nyu'].as_dict()  # The dataset's own.
  with open(os.path.join(workdir, 'eval', 'best.json')) as f:
    assert json.load(f) == {'step': 4, 'metric': 'depth/rmse', 'value': figures['depth/rmse']}
  model, _, step = checkpoints.load_model(os.path.join(workdir, 'best_checkpoint'))
  assert step == 4 and model.heads == ('depth', 'aif')
  # TensorBoard events for scalars and images.
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir,
                                                                                  'eval')))


def test_training_with_a_camera_range_renders_and_records_the_cameras(tiny_data_dir, tmp_path,
                                                                     caplog, own_program_cache):
  """Focus drawn from 1.5-3 m per example, rendered in the step, fed to the network; the
  cameras are histograms in TensorBoard and evaluation renders at the range's middle."""
  caplog.set_level('DEBUG', logger='jax._src.dispatch')
  workdir = str(tmp_path / 'run')
  config = tiny_config(tiny_data_dir, num_train_steps=4)
  config.dataset.camera.focus_distance = (1.5, 3.0)
  config.model.camera_input = True
  train_lib.train(config, workdir)
  # Compiled in the background only, for the batch the pipeline gives with a camera
  # (render_depth, no image): the loop calls that program, which takes no other batch.
  compiles = train_step_compiles(caplog)
  assert compiles and 'MainThread' not in compiles, compiles
  histograms = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag.startswith('camera/'):
          # Buckets as (left edge, right edge, count) rows.
          histograms.setdefault(value.tag, []).append(tf.make_ndarray(value.tensor))
  assert set(histograms) == {f'camera/{name}' for name in defocus.CAMERA_FIELDS}
  focus = np.concatenate(histograms['camera/focus_distance'])
  drawn = focus[focus[:, 2] > 0]
  assert drawn[:, 2].sum() == 4 * config.batch_size  # Every example of the 4 steps.
  assert 1.5 <= drawn[:, 0].min() and drawn[:, 1].max() <= 3.0
  assert drawn[:, 0].max() - drawn[:, 0].min() > 0.3  # Not one value.
  f_number = np.concatenate(histograms['camera/f_number'])
  assert f_number[f_number[:, 2] > 0][:, :2] == pytest.approx(2.8)

  eval_lib.evaluate(None, workdir, once=True, timeout_secs=5)
  with open(os.path.join(workdir, 'eval', 'metrics_4.json')) as f:
    figures = json.load(f)
  assert figures['defocused_input'] == 'rendered'
  assert figures['camera'] == dict(focal_length=0.015, f_number=2.8, pixel_size=5.6e-6,
                                   focus_distance=2.25)
  assert np.isfinite(figures['depth/rmse']) and np.isfinite(figures['input/psnr'])


def test_eval_follows_new_checkpoints():
  """The follower yields each newer step as it appears and gives up after the timeout."""

  class FakeManager:
    def __init__(self):
      self.appearing = [None, 2, 2, 5, 9]
      self.latest = None

    def reload(self):
      if self.appearing:
        self.latest = self.appearing.pop(0)

    def latest_step(self):
      return self.latest

  assert list(eval_lib._new_steps(FakeManager(), timeout=0.2, poll=0.01)) == [2, 5, 9]


def test_mesh_covers_devices_or_says_how():
  config = tiny_config('unused')
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.shape == {'data': jax.device_count(), 'model': 1}
  config.mesh.data = jax.device_count() + 1
  with pytest.raises(ValueError, match='config.mesh.data=-1'):
    sharding.make_mesh(config.mesh)
  # A model axis the devices cannot hold: the fix is that axis's, whatever data says.
  config.mesh.update(data=-1, model=jax.device_count() + 1)
  with pytest.raises(ValueError, match=rf'config.mesh.model={jax.device_count() + 1} does not '
                     rf'divide the {jax.device_count()} devices: .* --config.mesh.model=1'):
    sharding.make_mesh(config.mesh)


def test_learning_rate_decays_after_the_configured_epoch():
  config = tiny_config('unused')
  config.optimizer.decay_epochs = (2,)
  schedule = train_lib.learning_rate_schedule(config, steps_per_epoch=10)
  lr = config.optimizer.learning_rate
  assert float(schedule(19)) == pytest.approx(lr)
  assert float(schedule(20)) == pytest.approx(lr * 0.1)


def test_remat_trains_identically(tiny_data_dir, tmp_path):
  """Recomputing activations changes what the step keeps for its backward pass (see
  test_models), not what it computes. (Gradients are compared in test_models; after an Adam
  step float noise in a near-zero gradient can move a parameter by up to the learning rate, so
  parameters are not.)"""
  results = {}
  for remat in (False, True):
    config = tiny_config(tiny_data_dir)
    config.model.remat = remat
    trainer = train_lib.Trainer(config, train_size=config.batch_size)
    with jax.set_mesh(trainer.mesh):
      batch = sharding.global_batch(batches.random_batch(config), trainer.batch_sharding)
      state, metrics = trainer.step_fn(trainer.initial_state(), batch)
    results[remat] = (jax.tree.map(np.asarray, state.batch_stats.to_pure_dict()),
                      float(metrics['loss']), float(metrics['grad_norm']))
  (plain_stats, *plain_metrics), (remat_stats, *remat_metrics) = results[False], results[True]
  assert remat_metrics == pytest.approx(plain_metrics, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               plain_stats, remat_stats)


def test_flattened_adam_gives_the_per_parameter_updates(tiny_data_dir):
  """optimizer.flatten: Adam (here AdamW, after clipping) over one vector of all the
  parameters updates each as the per-parameter one does; its moments are one vector each."""
  config = tiny_config(tiny_data_dir)
  config.optimizer.update(weight_decay=0.1, grad_clip_norm=1.0)
  params = {'kernel': np.arange(12.0, dtype=np.float32).reshape(3, 4) / 10,
            'scale': np.ones(5, np.float32)}
  results = {}
  for flatten in (False, True):
    config.optimizer.flatten = flatten
    tx = train_lib.make_optimizer(config, optax.constant_schedule(1e-2))
    opt_state, updated = tx.init(params), params
    for seed in range(3):
      grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed), x.shape), params)
      updates, opt_state = tx.update(grads, opt_state, updated)
      updated = optax.apply_updates(updated, updates)
    results[flatten] = updated, opt_state
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               results[False][0], results[True][0])
  assert {x.shape for x in jax.tree.leaves(results[True][1])} == {(), (17,)}


def test_a_run_with_flattened_adam_resumes(tiny_data_dir, tmp_path):
  config = tiny_config(tiny_data_dir, num_train_steps=2)
  config.optimizer.flatten = True
  workdir = str(tmp_path / 'run')
  train_lib.train(config, workdir)
  config.num_train_steps = 3
  state = train_lib.train(config, workdir)
  assert int(state.step) == 3 and steps_in(workdir) == [2, 3]
  assert {x.ndim for x in jax.tree.leaves(state.opt_state)} == {0, 1}


def test_native_resolution_protocol_scores_the_resized_prediction(tiny_data_dir):
  """make3d_literature's scoring: the prediction at the input size (64x64 here), resized to the
  stored 32x32 ground truth, against the ground truth as stored."""
  config = tiny_config(tiny_data_dir)
  config.dataset.image_size = (64, 64)
  config.dataset.eval_protocol = 'make3d_literature'
  model = models.create_model(config.model)
  evaluator = eval_lib.Evaluator(config, model, mean_depth=1.0)
  _, graphdef, params, batch_stats = models.split_model(model)
  assert evaluator.source.keeps_examples  # Every evaluation after the first reads none.
  local = next(input_pipeline.eval_batches(config, evaluator.source))
  assert local['image'].shape[1:3] == (64, 64) and local['depth'].shape[1:] == (32, 32)
  with jax.set_mesh(evaluator.mesh):
    batch = sharding.global_batch(local, evaluator.batch_sharding)
    result, outputs = jax.jit(functools.partial(
        eval_lib.eval_step, graphdef=graphdef, protocol=evaluator.protocol,
        dataset_config=config.dataset, mean_depth=1.0))(
            params, batch_stats, batch)
  predicted = jax.jit(lambda p, b, x: nnx.merge(graphdef, p, b)(x))(
      params, batch_stats, local['image'])['depth']
  expected = metrics.resize_depth(predicted, (32, 32))
  np.testing.assert_allclose(outputs['depth'], expected, rtol=1e-5, atol=1e-5)
  rmse = metrics.depth_metrics(expected, local['depth'], config.dataset.min_depth,
                               config.dataset.max_depth, valid=local['depth_valid'])['rmse']
  np.testing.assert_allclose(result.compute()['depth/rmse'], np.mean(rmse), rtol=1e-4)


@pytest.mark.parametrize('overrides, problem', [
    ({'batch_size': 0}, 'config.batch_size=0: must be at least 1'),
    ({'num_train_steps': -1, 'num_epochs': 0},
     'config.num_train_steps=-1 and config.num_epochs=0: set one of them above 0'),
    ({'dataset.image_size': (64,)}, 'config.dataset.image_size=(64,): give HEIGHT,WIDTH, each a '
     'positive multiple of 32 (the encoder halves it five times), e.g. '
     '--config.dataset.image_size=64,64'),
    ({'dataset.image_size': (30, 100)}, 'config.dataset.image_size=(30, 100): give HEIGHT,WIDTH, '
     'each a positive multiple of 32 (the encoder halves it five times), e.g. '
     '--config.dataset.image_size=32,96'),
    ({'dataset.image_size': (0, 64)}, 'e.g. --config.dataset.image_size=32,64'),
])
def test_impossible_config_values_stop_before_anything_runs(overrides, problem, tmp_path):
  config = tiny_config(str(tmp_path))
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match='Impossible config values') as raised:
    train_lib.train(config, str(tmp_path / 'run'))
  assert problem in str(raised.value)
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('init_from', ['/tmp/run', 'checkpoint:/nonexistent'])
def test_a_new_run_stops_on_an_init_from_that_names_no_folder_before_compiling(
    tiny_data_dir, tmp_path, monkeypatch, init_from):
  def compile_step(*args):
    raise AssertionError('compiled the step first')

  monkeypatch.setattr(train_lib.Trainer, 'compile_step_in_background', compile_step)
  config = tiny_config(tiny_data_dir, init_from=init_from)
  with pytest.raises((ValueError, FileNotFoundError), match=f'init_from={init_from!r}: '):
    train_lib.train(config, str(tmp_path / 'run'))
