"""Preparing datasets: `registry.prepare`, `python -m tfds_builders.prepare`, and the input
pipeline's "not prepared" hint and auto-prepare (one builder among several processes)."""

import os
import pathlib
import shlex
import socket
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from hded_jax import defocus
from hded_jax import input_pipeline
from tests.fixtures import defocus_sources
from tfds_builders import registry
from tfds_builders.nyu_depth_v2_defocus import nyu_depth_v2_defocus_dataset_builder as nyu

NAME = 'nyu_depth_v2_defocus'
CONFIG = defocus_sources.nyu_config()
REPO_ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture
def manual_dir(tmp_path):
  path = tmp_path / 'manual'
  path.mkdir()
  defocus_sources.write_nyu_sources(path)
  return path


def dataset_folders(data_dir) -> list[str]:
  """Everything under data_dir/<name>/<config>/, where TFDS puts versions and temporaries."""
  config_dir = data_dir / NAME / CONFIG.name
  return sorted(p.name for p in config_dir.iterdir()) if config_dir.exists() else []


def is_prepared(data_dir) -> bool:
  return tfds.builder(NAME, config=CONFIG, data_dir=data_dir).is_prepared()


def run_program(*args: str, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        check=False, cwd=REPO_ROOT, **kwargs)


def test_the_registry_is_what_tfds_knows():
  for name, builder_class in registry.DATASETS.items():
    assert tfds.builder_cls(name) is builder_class
    assert registry.builder(name).name == name


def test_missing_files_fail_before_any_work(tmp_path):
  data_dir = tmp_path / 'data'
  with pytest.raises(FileNotFoundError) as e:
    registry.prepare(NAME, data_dir=data_dir, manual_dir=tmp_path / 'nowhere')
  message = str(e.value)
  assert f'in the manual folder {tmp_path / "nowhere"}' in message
  assert 'That folder does not exist.' in message
  for name, url in nyu.MANUAL_FILES.items():
    assert f'{name}  <- {url}' in message
  assert not data_dir.exists()


def test_the_command_line_reports_missing_files(tmp_path):
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / nyu.SPLITS_MAT).write_bytes(b'')
  result = run_program('-m', 'tfds_builders.prepare', 'make3d_defocus',
                       f'--manual_dir={tmp_path / "manual"}', f'--data_dir={tmp_path / "data"}')
  assert result.returncode != 0
  assert 'missing Train400Img.tar.gz, Train400Depth.tgz, Test134.tar.gz, Test134Depth.tar.gz' \
      in result.stderr
  assert f"That folder holds: ['{nyu.SPLITS_MAT}']" in result.stderr
  assert not (tmp_path / 'data').exists()


def test_unknown_dataset_and_config_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='choose one of'):
    registry.prepare('nyu_depth_v2', data_dir=tmp_path)
  # With the configs to choose from (TFDS's own error lists none of them).
  with pytest.raises(ValueError, match=r"Unknown config 'focus_3m' of nyu_depth_v2_defocus; "
                     r"choose one of \['focus_2m', 'focus_4m', "):
    registry.prepare(NAME, data_dir=tmp_path, config='focus_3m')
  assert not (tmp_path / NAME).exists()


def test_a_failure_mid_generation_leaves_nothing_that_looks_prepared(
    tmp_path, manual_dir, monkeypatch):
  data_dir = tmp_path / 'data'
  render, calls = defocus.render_defocus, []

  def fail_on_third_frame(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('interrupted')
    return render(*args, **kwargs)

  monkeypatch.setattr(defocus, 'render_defocus', fail_on_third_frame)
  with pytest.raises(RuntimeError, match='interrupted'):
    registry.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert len(calls) == 3
  assert not is_prepared(data_dir)
  assert dataset_folders(data_dir) == []  # The temporary folder is gone too.

  monkeypatch.setattr(defocus, 'render_defocus', render)
  builder = registry.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert is_prepared(data_dir) and dataset_folders(data_dir) == ['2.0.0']
  # Array-record files, so the input pipeline gets random access.
  source = builder.as_data_source(split='test')
  assert len(source) == len(defocus_sources.NYU_TEST)
  np.testing.assert_array_equal(source[1]['aif'],
                                defocus_sources.nyu_frames()[0][source[1]['index']])

  # Once prepared, preparing again renders nothing.
  monkeypatch.setattr(defocus, 'render_defocus', None)
  assert registry.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir,
                          config=CONFIG).is_prepared()


def test_a_killed_build_leaves_nothing_that_looks_prepared(tmp_path, manual_dir):
  """A process killed mid-build (no clean-up runs) leaves only an `incomplete.*` folder."""
  data_dir = tmp_path / 'data'
  script = textwrap.dedent(f"""
      import os
      from hded_jax import defocus
      from tests.fixtures import defocus_sources
      from tfds_builders import registry

      def die(*args, **kwargs):
        os._exit(17)

      defocus.render_defocus = die
      registry.prepare({NAME!r}, data_dir={str(data_dir)!r}, manual_dir={str(manual_dir)!r},
                       config=defocus_sources.nyu_config())
  """)
  result = run_program('-c', script)
  assert result.returncode == 17, result.stderr
  leftovers = dataset_folders(data_dir)
  assert len(leftovers) == 1 and leftovers[0].startswith('incomplete.'), leftovers
  assert not is_prepared(data_dir)

  registry.prepare(NAME, data_dir=data_dir, manual_dir=manual_dir, config=CONFIG)
  assert is_prepared(data_dir)


def dataset_config(name: str, builder_config: str, data_dir, auto_prepare=False):
  return ml_collections.ConfigDict({'dataset': {
      'name': name, 'builder_config': builder_config, 'data_dir': str(data_dir),
      'auto_prepare': auto_prepare}})


def test_the_not_prepared_hint_names_the_config_and_only_needed_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.dataset_builder(dataset_config(NAME, 'focus_4m', tmp_path))
  assert (f'python -m tfds_builders.prepare {NAME} --config=focus_4m --data_dir={tmp_path} '
          '--manual_dir=DIR_WITH_THE_DOWNLOADED_FILES') in str(e.value)
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.dataset_builder(dataset_config('synthetic_defocus', 'tiny', tmp_path))
  message = str(e.value)
  assert 'Dataset synthetic_defocus/tiny is not prepared' in message and 'manual' not in message
  # The hint is a command that works.
  command = message.split('`')[1]
  assert command == (f'python -m tfds_builders.prepare synthetic_defocus --config=tiny '
                     f'--data_dir={tmp_path}')
  result = run_program(*shlex.split(command)[1:], '--num_workers=1')
  assert result.returncode == 0, result.stderr
  assert 'with 1 worker process(es)' in result.stderr and 'frames/s' in result.stderr
  builder = input_pipeline.dataset_builder(dataset_config('synthetic_defocus', 'tiny', tmp_path))
  assert builder.info.splits['train'].num_examples == 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_auto_prepare_in_two_processes_builds_once(tmp_path):
  script = textwrap.dedent(f"""
      import sys, time
      import jax
      jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
      import ml_collections
      from hded_jax import input_pipeline
      from hded_jax import runtime
      from tfds_builders import synthetic_defocus

      tensorflow = runtime.tensorflow
      runtime.tensorflow = lambda: print('TensorFlow kept off the accelerators') or tensorflow()

      prepare = synthetic_defocus.Builder._download_and_prepare
      def announce_and_prepare(*args, **kwargs):
        print('building in process', jax.process_index(), flush=True)
        # A second builder would start meanwhile, if there were one; and the other process
        # waits longer than gloo waits for a process to join a collective (30 s), as it waits
        # for a real dataset's build.
        time.sleep(35)
        return prepare(*args, **kwargs)
      synthetic_defocus.Builder._download_and_prepare = announce_and_prepare
      from tfds_builders import registry
      prepare_dataset = registry.prepare
      registry.prepare = lambda *args, **kwargs: print(
          'workers', kwargs['num_workers']) or prepare_dataset(*args, **kwargs)

      config = ml_collections.ConfigDict({{'dataset': {{
          'name': 'synthetic_defocus', 'builder_config': 'tiny', 'data_dir': {str(tmp_path)!r},
          'auto_prepare': True}}}})
      builder = input_pipeline.dataset_builder(config)
      print('process', jax.process_index(), 'reads', len(builder.as_data_source('train')))
  """)
  address = f'127.0.0.1:{_free_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  processes = [subprocess.Popen(
      [sys.executable, '-c', script, address, str(i)], cwd=REPO_ROOT, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for i, (process, output) in enumerate(zip(processes, outputs)):
    assert process.returncode == 0, output
    assert f'process {i} reads 8' in output
  assert 'building in process 0' in outputs[0]
  # On every core, as `python -m tfds_builders.prepare` builds it.
  assert f'workers {len(os.sched_getaffinity(0))}' in outputs[0]
  # Before TFDS's build can start TensorFlow's runtime.
  assert (outputs[0].index('TensorFlow kept off the accelerators') <
          outputs[0].index('building in process 0')), outputs[0]
  assert 'building in process' not in outputs[1]
