"""Damaged, changed and half-replaced checkpoints, and the paths eval and predict accept: every
read takes the newest step that restores and says which; nothing waits, and every error names
the directory or step at fault."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from hded_jax import checkpoints
from hded_jax import eval_lib
from hded_jax import input_pipeline
from hded_jax import train_lib
from tests.conftest import copy_run
from tests.conftest import REPO
from tests.conftest import tiny_config


def damage(step_dir: str, how: str) -> None:
  """Damage seen in the field: a partly written file, lost files, an emptied JSON."""
  if how == 'truncated data file':
    path = max(glob.glob(os.path.join(step_dir, 'model', 'ocdbt.process_0', 'd', '*')),
               key=os.path.getsize)
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'deleted manifest':
    os.remove(os.path.join(step_dir, 'model', 'manifest.ocdbt'))
  elif how == 'emptied data state':
    open(os.path.join(step_dir, 'data', 'process_0-of-1.json'), 'w').close()
  elif how == 'deleted train item':
    shutil.rmtree(os.path.join(step_dir, 'train'))
  else:
    raise ValueError(how)


# After a failed restore Orbax's reader threads report 'Event loop is closed' (the programs drop
# these reports: runtime.readable_logs).
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')

DAMAGE = ('truncated data file', 'deleted manifest', 'emptied data state', 'deleted train item')


def warnings_about(caplog, text):
  return [r.getMessage() for r in caplog.records
          if r.levelname == 'WARNING' and text in r.getMessage()]


@pytest.fixture(scope='module')
def trainer(tiny_data_dir):
  config = tiny_config(tiny_data_dir)
  return config, train_lib.Trainer(config, train_size=8)


def restore_run(config, trainer, ckpt_dir):
  data_iter = input_pipeline.train_iterator(
      config, input_pipeline.data_source(config, config.dataset.train_split))
  with checkpoints.manager(ckpt_dir) as mngr:
    return checkpoints.restore_train_state(mngr, trainer.abstract_state, data_iter,
                                           lambda saved: None)


@pytest.mark.parametrize('how', DAMAGE)
def test_a_damaged_newest_step_is_reported_set_aside_and_the_previous_one_restored(
    how, tiny_run, trainer, tmp_path, caplog):
  config, trainer = trainer
  ckpt_dir = os.path.join(copy_run(tiny_run, str(tmp_path / 'run')), 'checkpoints')
  damage(os.path.join(ckpt_dir, '4'), how)
  step, state = restore_run(config, trainer, ckpt_dir)
  assert step == 2 == int(state.step)
  [warning] = warnings_about(caplog, 'does not restore')
  assert f'step 4 ({ckpt_dir}/4) does not restore: ' in warning
  assert f'using step 2 instead; moved it to {ckpt_dir}/4.damaged' in warning
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4.damaged']


def test_when_no_step_restores_the_error_names_each(tiny_run, trainer, tmp_path):
  config, trainer = trainer
  ckpt_dir = os.path.join(copy_run(tiny_run, str(tmp_path / 'run')), 'checkpoints')
  damage(os.path.join(ckpt_dir, '4'), 'deleted train item')
  damage(os.path.join(ckpt_dir, '2'), 'emptied data state')
  with pytest.raises(checkpoints.CheckpointError) as info:
    restore_run(config, trainer, ckpt_dir)
  message = str(info.value)
  assert f'step 4 ({ckpt_dir}/4) does not restore: KeyError' in message
  assert f'step 2 ({ckpt_dir}/2) does not restore: JSONDecodeError' in message
  assert f'To train afresh, move {ckpt_dir} aside.' in message
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']  # Nothing set aside.
  # Readers (of the model alone) are told what a reader can do.
  for step in ('2', '4'):
    damage(os.path.join(ckpt_dir, step), 'deleted manifest')
  with pytest.raises(checkpoints.CheckpointError,
                     match='Copy the checkpoints again, or pass another checkpoint.'):
    checkpoints.load_model(ckpt_dir)


def test_a_checkpoint_that_cannot_be_written_ends_training_in_one_line(tiny_data_dir, tiny_run,
                                                                        tmp_path, monkeypatch):
  """As on a full disk: Orbax's error is pages long; the run's names the folder, the cause and
  the step a rerun resumes from."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))

  def full_disk(self, step, *args, **kwargs):
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{self.directory}/{step}.'
                     'orbax-checkpoint-tmp/_sharding": No space left on device')

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(checkpoints.CheckpointError) as raised:
    train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6), workdir)
  assert str(raised.value).startswith(
      f'A checkpoint could not be written to {workdir}/checkpoints: ValueError: '
      'RESOURCE_EXHAUSTED: ')
  assert str(raised.value).endswith('No space left on device. Free space or fix the folder, then '
                                    'rerun: training resumes from the newest complete step (4).')
  with pytest.raises(checkpoints.CheckpointError, match='training starts afresh'):
    train_lib.train(tiny_config(tiny_data_dir, num_train_steps=2), str(tmp_path / 'new_run'))


def test_training_resumes_past_a_damaged_step_and_writes_it_again(tiny_data_dir, tiny_run,
                                                                    tmp_path):
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  damage(os.path.join(workdir, 'checkpoints', '4'), 'truncated data file')
  state = train_lib.train(tiny_config(tiny_data_dir, num_train_steps=6), workdir)
  assert int(state.step) == 6
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4', '4.damaged', '6']


def test_a_changed_model_or_optimizer_stops_before_restoring(tiny_data_dir, tiny_run, tmp_path,
                                                             monkeypatch):
  """... and before compiling the step: the error comes at once."""
  compiles = []
  monkeypatch.setattr(train_lib.Trainer, 'compile_step_in_background',
                      lambda *args: compiles.append(args))
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  config = tiny_config(tiny_data_dir, num_train_steps=6)
  config.model.growth_rate = 12
  with pytest.raises(checkpoints.ConfigMismatchError) as info:
    train_lib.train(config, workdir)
  message = str(info.value)
  assert 'Fields that differ (1):\n  model.growth_rate: saved 8, now 12' in message
  assert 'rerun with the saved values' in message and 'new --workdir' in message
  assert 'init_from' not in message and 'strict' not in message

  config = tiny_config(tiny_data_dir, num_train_steps=6)
  config.optimizer.grad_clip_norm = 1.0
  with pytest.raises(checkpoints.ConfigMismatchError) as info:
    train_lib.train(config, workdir)
  message = str(info.value)
  assert 'optimizer.grad_clip_norm: saved 0.0, now 1.0' in message
  assert f'--config.init_from=checkpoint:{ckpt_dir}' in message
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']  # Neither counted as damage.
  assert not compiles


def test_train_py_exits_cleanly_when_no_step_restores_while_the_step_compiles(
    tiny_data_dir, tiny_run, tmp_path):
  """The step compiles (cold, on a background thread) while the checkpoint restores; when no
  step restores, train.py exits with the error once XLA is done: a process that exits while XLA
  compiles on another thread (a daemon one) aborts."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  for step in ('2', '4'):
    damage(os.path.join(workdir, 'checkpoints', step), 'deleted manifest')
  proc = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/smoke.py', f'--workdir={workdir}',
       f'--config.dataset.data_dir={tiny_data_dir}', '--config.dataset.auto_prepare=False',
       '--config.num_train_steps=6'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu', HDED_JAX_CACHE_DIR=str(tmp_path / 'cold')))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'restores' in proc.stderr and 'Fatal Python error' not in proc.stderr


def test_resuming_rebuilds_the_saved_layout_only_for_other_settings(tiny_data_dir, tiny_run,
                                                                     tmp_path, monkeypatch):
  """The saved model and optimizer settings are the config's: the layout is the trainer's, not
  rebuilt (2.3 s for the full model). Other settings: rebuilt and compared."""
  checked = []
  layout = train_lib.same_state_layout
  monkeypatch.setattr(train_lib, 'same_state_layout',
                      lambda *args: checked.append(args) or layout(*args))
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  config = tiny_config(tiny_data_dir)
  config.lock()  # As train.py's flags leave it; the saved config is not.
  assert int(train_lib.train(config, workdir).step) == 4 and not checked
  config.model.dropout_rate = 0.1
  assert int(train_lib.train(config, workdir).step) == 4 and len(checked) == 1


def test_only_changes_to_the_state_layout_block_resuming(trainer):
  config, trainer = trainer
  state = trainer.abstract_state
  assert train_lib.same_state_layout(config, state)
  for section, field, value, same in (('model', 'remat', True, True),
                                      ('model', 'dropout_rate', 0.1, True),
                                      ('optimizer', 'learning_rate', 1e-5, True),
                                      ('model', 'growth_rate', 12, False),
                                      ('model', 'heads', ('depth',), False),
                                      ('optimizer', 'weight_decay', 1e-4, False),
                                      ('optimizer', 'flatten', True, False)):
    changed = config.copy_and_resolve_references()
    changed[section][field] = value
    assert train_lib.same_state_layout(changed, state) == same, field


def test_eval_once_never_waits_and_names_what_it_expected(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'file').write_text('x')
  for name, error, says in (('empty', FileNotFoundError, 'It is empty'),
                            ('typo', FileNotFoundError, 'does not exist'),
                            ('file', NotADirectoryError, 'is a file')):
    path = str(tmp_path / name)
    start = time.monotonic()
    with pytest.raises(error) as info:
      eval_lib.evaluate(None, path, once=True, timeout_secs=30, poll_secs=0.1)
    assert time.monotonic() - start < 5, name
    message = str(info.value)
    assert path in message and says in message and 'checkpoints/<step>' in message, message


def test_following_a_checkpoint_directory_instead_of_a_run_stops_at_once(tiny_run):
  """Training never writes a run's checkpoints into a checkpoint directory or step, so eval.py
  without --once would wait there until its timeout."""
  for given, kind in (('checkpoints', 'directory'), ('checkpoints/2', 'step')):
    path = os.path.join(tiny_run, given)
    start = time.monotonic()
    with pytest.raises(ValueError, match=f'is a checkpoint {kind}, not a training run\'s '
                       'WORKDIR: evaluate it with --once'):
      eval_lib.evaluate(None, path, timeout_secs=30, poll_secs=0.1)
    assert time.monotonic() - start < 5, given


def test_eval_once_takes_a_run_its_best_checkpoint_or_one_step(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  by_run = eval_lib.evaluate(None, workdir, once=True, timeout_secs=0)
  assert list(by_run) == [4]
  assert os.listdir(os.path.join(workdir, 'best_checkpoint')) == ['4']
  by_best = eval_lib.evaluate(None, os.path.join(workdir, 'best_checkpoint'), once=True,
                              timeout_secs=0)
  assert by_best == by_run
  by_step = eval_lib.evaluate(None, os.path.join(workdir, 'checkpoints', '2'), once=True,
                              timeout_secs=0)
  assert list(by_step) == [2]
  assert {'metrics_2.json', 'metrics_4.json'} <= set(os.listdir(os.path.join(workdir, 'eval')))
  assert eval_lib.run_dir(os.path.join(workdir, 'best_checkpoint'), once=True) == workdir
  # Only a run's training checkpoints get a best one, however the folder is written.
  for given, best in (('checkpoints', 'best_checkpoint'), ('checkpoints/', 'best_checkpoint'),
                      ('best_checkpoint', None), ('checkpoints/2', None)):
    expected = best and os.path.join(workdir, best)
    assert checkpoints.best_checkpoint_dir(os.path.join(workdir, given)) == expected, given


def test_eval_writes_into_output_dir_and_leaves_the_run_alone(tiny_run, tmp_path, monkeypatch):
  """Checkpoints in a read-only place: the default results folder is refused before anything
  loads, naming --output_dir; with it the run's folder is not written (no best checkpoint)."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  before = sorted(os.listdir(workdir))
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode: (
      path != workdir and real_access(path, mode)))  # As root, only a read-only mount refuses.
  for once in (True, False):
    with pytest.raises(PermissionError, match=(
        f'The results go to {workdir}/eval by default: {workdir} is not writable .* Pass '
        '--output_dir=FOLDER')):
      eval_lib.run_dir(workdir, once=once)
  output_dir = str(tmp_path / 'elsewhere')
  assert eval_lib.run_dir(workdir, once=True, output_dir=output_dir) == output_dir
  (tmp_path / 'file').write_text('')  # What the path is comes before where results go.
  with pytest.raises(NotADirectoryError, match='is a file: pass the training run'):
    eval_lib.run_dir(str(tmp_path / 'file'), once=False)
  results = eval_lib.evaluate(None, workdir, once=True, timeout_secs=0, output_dir=output_dir)
  assert list(results) == [4]
  assert os.listdir(os.path.join(output_dir, 'eval')) and sorted(os.listdir(workdir)) == before
  # The run's own folder given as --output_dir is the default: the best step is kept.
  eval_lib.evaluate(None, workdir, once=True, timeout_secs=0, output_dir=workdir)
  assert os.listdir(os.path.join(workdir, 'best_checkpoint')) == ['4']


def test_eval_and_predict_fall_back_past_a_damaged_step_and_say_which(tiny_run, tmp_path,
                                                                       caplog):
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  damage(os.path.join(ckpt_dir, '4'), 'deleted manifest')
  caplog.set_level(logging.INFO, logger='absl')
  assert list(eval_lib.evaluate(None, workdir, once=True, timeout_secs=0)) == [2]
  assert any(f'Evaluating {ckpt_dir} step 2' in r.getMessage() for r in caplog.records)
  # Following the run: step 2 is evaluated, damaged step 4 skipped with a warning.
  caplog.clear()
  assert list(eval_lib.evaluate(None, workdir, timeout_secs=0.5, poll_secs=0.1)) == [2]
  assert len(warnings_about(caplog, f'step 4 ({ckpt_dir}/4) does not restore')) == 2
  _, _, step = checkpoints.load_model(workdir)
  assert step == 2
  assert sorted(os.listdir(ckpt_dir)) == ['2', '4']  # Readers set nothing aside.
  with pytest.raises(checkpoints.CheckpointError, match=f'step 4 \\({ckpt_dir}/4\\).* Pass '
                     f'{ckpt_dir} instead to use its newest step that restores.'):
    checkpoints.load_model(os.path.join(ckpt_dir, '4'))  # A step asked for: no fallback.


def test_a_step_directory_is_a_checkpoint(tiny_run):
  _, config, step = checkpoints.load_model(os.path.join(tiny_run, 'checkpoints', '2'))
  assert step == 2 and config.model.growth_rate == 8
  assert checkpoints.locate(tiny_run) == (os.path.join(tiny_run, 'checkpoints'), None)


def test_the_best_step_is_kept_though_training_deleted_it_meanwhile(tiny_run, tmp_path,
                                                                     monkeypatch):
  """Training keeps its newest few steps: the one being evaluated may go before it is kept.
  The best checkpoint is written from the model in memory, and scores as the step did."""
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  evaluate = eval_lib.Evaluator.evaluate

  def evaluate_as_training_deletes_the_step(self, model):
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
    return evaluate(self, model)

  monkeypatch.setattr(eval_lib.Evaluator, 'evaluate', evaluate_as_training_deletes_the_step)
  results = eval_lib.evaluate(None, workdir, once=True, timeout_secs=0)
  monkeypatch.undo()
  best_dir = os.path.join(workdir, 'best_checkpoint')
  assert list(results) == [4] and os.listdir(best_dir) == ['4']
  assert eval_lib.evaluate(None, best_dir, once=True, timeout_secs=0) == results


class Killed(BaseException):
  """Stands for SIGKILL: nothing catches it."""


def test_best_checkpoint_survives_a_kill_between_removing_and_replacing_it(
    tiny_run, tmp_path, monkeypatch):
  workdir = copy_run(tiny_run, str(tmp_path / 'run'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  best_dir = os.path.join(workdir, 'best_checkpoint')
  model, config, _ = checkpoints.load_model(os.path.join(ckpt_dir, '2'))
  checkpoints.save_best(best_dir, 2, model, config)
  os.makedirs(os.path.join(workdir, 'eval'), exist_ok=True)
  with open(os.path.join(workdir, 'eval', 'best.json'), 'w') as f:
    json.dump({'step': 2, 'metric': 'depth/rmse', 'value': 1.0}, f)
  # Killed as the new copy is moved in, after the old one went away.
  replace = os.replace

  def killed_moving_in(src, dst):
    if src.endswith('.tmp'):
      raise Killed()
    replace(src, dst)

  monkeypatch.setattr(os, 'replace', killed_moving_in)
  with pytest.raises(Killed):
    checkpoints.save_best(best_dir, 4, model, config)
  monkeypatch.setattr(os, 'replace', replace)
  # The rerun scores step 4 worse than the recorded best: it must not leave best lost.
  monkeypatch.setattr(eval_lib.Evaluator, 'evaluate',
                      lambda self, model: ({'depth/rmse': 9.0, 'num_images': 4.0}, {}))
  eval_lib.evaluate(None, workdir, once=True, timeout_secs=0)
  assert os.listdir(best_dir) == ['2']
  assert not [n for n in os.listdir(workdir) if n.startswith('best_checkpoint.')]
  assert checkpoints.load_model(best_dir)[2] == 2

