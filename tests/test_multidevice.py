"""The same training code on 1 device, 8 (forced CPU) devices and two processes on loopback."""

import functools
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import copy_run
from tests.conftest import forced_devices_xla_flags
from tests.conftest import REPO
from tests.train_worker import finish
from tests.train_worker import launch

STEPS = 4
run_worker = functools.partial(launch, num_steps=STEPS)


def logged(workdir, tag):
  """{step: value} of a scalar from the run's TensorBoard events."""
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  return values


@pytest.mark.parametrize('focus_range', [None, (1.5, 3.0)], ids=['stored', 'camera_range'])
def test_one_and_eight_devices_give_the_same_loss_curve(tiny_data_dir, tmp_path, focus_range):
  """Data parallel over 8 devices, BatchNorm statistics over the global batch: the same maths as
  one device, up to float reduction order; with a camera range, each device renders its share
  of the batch with the cameras the input pipeline drew."""
  one = run_worker(tiny_data_dir, str(tmp_path / 'one'), devices=1, batch_size=8,
                   focus_range=focus_range)
  finish(one)
  eight = run_worker(tiny_data_dir, str(tmp_path / 'eight'), devices=8, batch_size=8,
                     focus_range=focus_range)
  out = finish(eight)
  assert f'final step {STEPS} on 8 devices in 1 processes' in out
  loss_one, loss_eight = logged(str(tmp_path / 'one'), 'loss'), logged(str(tmp_path / 'eight'),
                                                                      'loss')
  assert sorted(loss_one) == list(range(1, STEPS + 1)) == sorted(loss_eight)
  curve_one, curve_eight = ([loss[s] for s in sorted(loss)] for loss in (loss_one, loss_eight))
  # Step 1 is the initial weights' forward pass. Adam then moves each weight by about the
  # learning rate however small its gradient, so gradients near zero whose sign the reduction
  # order flips move the later losses: up to 3e-4 at step 4 with jax 0.12, 1e-5 with jax 0.10.
  np.testing.assert_allclose(curve_eight[0], curve_one[0], rtol=1e-5)
  np.testing.assert_allclose(curve_eight, curve_one, rtol=2e-3)
  assert loss_one[STEPS] != loss_one[1]  # it trained


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback(tiny_data_dir, tmp_path):
  """jax.distributed over loopback with gloo CPU collectives: 2 processes x 2 devices."""
  workdir = str(tmp_path / 'multihost')
  env = {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{_free_port()}', 'JAX_NUM_PROCESSES': '2',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  procs = [run_worker(tiny_data_dir, workdir, devices=2, batch_size=8,
                      extra_env={**env, 'JAX_PROCESS_ID': str(i)}) for i in range(2)]
  outs = [finish(p) for p in procs]
  for out in outs:
    assert f'final step {STEPS} on 4 devices in 2 processes' in out
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(STEPS)))
  assert sorted(logged(workdir, 'loss')) == list(range(1, STEPS + 1))  # process 0 wrote them


def test_sigterm_to_one_of_two_processes_stops_both_at_one_saved_step(tiny_data_dir, tmp_path):
  """A preempted host: both processes save the step that JAX's preemption service has them
  agree on, and exit cleanly. (A SIGTERM handler of Python's replaced the service's: no
  process ever stopped.) Ctrl-C reaches the service as a SIGTERM (tests/test_train.py)."""
  workdir = str(tmp_path / 'run')
  env = {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{_free_port()}', 'JAX_NUM_PROCESSES': '2',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  steps = 200
  procs = [launch(tiny_data_dir, workdir, num_steps=steps, batch_size=8, devices=2,
                  checkpoint_every_steps=5, extra_env={**env, 'JAX_PROCESS_ID': str(i)})
           for i in range(2)]
  deadline = time.monotonic() + 300
  while not os.path.isdir(os.path.join(workdir, 'checkpoints', '5')):  # Training is under way.
    assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)
  outs = [finish(p) for p in procs]
  stopped = {int(re.search(r'final step (\d+)', out).group(1)) for out in outs}
  assert len(stopped) == 1 and max(stopped) < steps, stopped
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(max(stopped))))


def test_processes_that_do_not_share_the_workdir_stop_before_training(tiny_data_dir, tmp_path):
  """Two hosts' own disks, as two processes given different workdirs: every process stops
  naming the ones that do not see process 0's workdir (Orbax would fail at the first save)."""
  env = {'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{_free_port()}', 'JAX_NUM_PROCESSES': '2',
         'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo'}
  procs = [run_worker(tiny_data_dir, str(tmp_path / f'disk_{i}' / 'run'), devices=2,
                      batch_size=8, extra_env={**env, 'JAX_PROCESS_ID': str(i)})
           for i in range(2)]
  for proc in procs:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert 'is not one directory for all 2 processes: processes [1] do not see' in out, (
        out[-3000:])
  assert not (tmp_path / 'disk_0' / 'run' / 'checkpoints').exists()


def _program(program, *args, devices, data_dir):
  """``program`` (train.py, eval.py) with configs/smoke.py on the tiny dataset, on ``devices``
  forced CPU devices."""
  env = dict(os.environ, XLA_FLAGS=forced_devices_xla_flags(devices), PYTHONPATH=REPO,
             JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, program, '--config=configs/smoke.py',
       f'--config.dataset.data_dir={data_dir}', '--config.dataset.auto_prepare=False', *args],
      cwd=REPO, env=env, capture_output=True, text=True)


def test_a_train_batch_that_does_not_split_over_the_devices_stops_with_a_clear_error(
    tiny_data_dir, tmp_path):
  """The field and a size that splits, before anything is written (JAX's own error came from
  inside the first step, after the workdir was made)."""
  workdir = tmp_path / 'run'
  train = _program('train.py', f'--workdir={workdir}', '--config.batch_size=4', devices=8,
                   data_dir=tiny_data_dir)
  assert train.returncode != 0
  assert ('config.batch_size=4 does not split evenly over the 8 devices' in train.stderr and
          'a multiple of 8, e.g. 8.' in train.stderr), train.stderr[-3000:]
  assert not workdir.exists()


def test_evaluation_rounds_its_batch_up_to_split_over_the_devices(tiny_data_dir, tiny_run,
                                                                 tmp_path):
  """Padded examples are masked out: 12 examples a batch on one device, 16 on eight, the same
  figures (a run's saved config may come from a host with fewer devices)."""
  figures = {}
  for devices in (1, 8):
    workdir = copy_run(tiny_run, str(tmp_path / f'on_{devices}'))
    evaluated = _program('eval.py', f'--workdir={workdir}', '--once',
                         '--config.eval_batch_size=12', devices=devices, data_dir=tiny_data_dir)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert ('Evaluating in batches of 16' in evaluated.stderr) == (devices == 8)
    (path,) = glob.glob(os.path.join(workdir, 'eval', 'metrics_*.json'))
    with open(path) as f:
      figures[devices] = json.load(f)
  numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, float)}
  assert numbers(figures[1]) and numbers(figures[1]).keys() == numbers(figures[8]).keys()
  for name, value in numbers(figures[1]).items():
    np.testing.assert_allclose(numbers(figures[8])[name], value, rtol=1e-5, err_msg=name)
