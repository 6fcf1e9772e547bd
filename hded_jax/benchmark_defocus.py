r"""Defocus rendering speed: one frame on one core, dataset preparation on several, and blur maps
stored against computed.

  python -m hded_jax.benchmark_defocus [--variants=d3net,clean:0,clean] [--repeats=5]
  python -m hded_jax.benchmark_defocus --measure=prepare [--workers=1,2] [--frames=16]
  python -m hded_jax.benchmark_defocus --measure=blur_map [--frame_size=480,640]

`render` times ``render_defocus`` on an NYU-like frame (``synthetic_defocus.room_scene``, depths
0.5-10 m, 480x640 unless --frame_size says otherwise), pinned to one core with XLA
single-threaded. `prepare` renders and encodes
frames as the NYU builder does (its ``render_example`` through ``map_in_order``) on 1, 2, ...
worker processes, and estimates the rate on more cores from the rate per worker and the cost of
what the writing process does for every frame. `blur_map` weighs storing each example's blur
map (a zlib-compressed float32 feature, as the depth is stored) against computing it from the
depth and the camera (`input_pipeline.blur_map`): bytes per example and time per example.
"""

import functools
import os
import time
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags

from hded_jax import defocus
from hded_jax import input_pipeline
from hded_jax import runtime
from hded_jax.benchmarking import measure
from tfds_builders import common
from tfds_builders import synthetic_defocus
from tfds_builders.nyu_depth_v2_defocus import nyu_depth_v2_defocus_dataset_builder as nyu

_MEASURE = flags.DEFINE_enum('measure', 'render', ['render', 'prepare', 'blur_map'],
                             'What to time.')
_VARIANTS = flags.DEFINE_list(
    'variants', ['d3net', 'clean:0', 'clean'],
    'render: mode[:sigma_tolerance] of each variant (default tolerance: the mode\'s own).')
_FRAME_SIZE = flags.DEFINE_list('frame_size', ['480', '640'], 'Height and width of the frames.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'render: timed calls per variant.')
_WORKERS = flags.DEFINE_list('workers', ['1', '2'], 'prepare: worker counts to compare.')
_FRAMES = flags.DEFINE_integer('frames', 16, 'prepare: frames rendered per worker count.')
_ESTIMATE_CORES = flags.DEFINE_integer('estimate_cores', 16,
                                       'prepare: the core count to estimate the rate for.')

NYU_FRAMES = 1449


def measure_render(size: tuple[int, int], variants: Sequence[str], repeats: int) -> None:
  image, depth = synthetic_defocus.room_scene(*size)
  camera = defocus.CAMERAS['nyu']
  print(f'{size[0]}x{size[1]} frame, depth {depth.min():.2f}-{depth.max():.2f} m, CPU core '
        f'{sorted(os.sched_getaffinity(0))}')
  for variant in variants:
    mode, _, tolerance = variant.partition(':')
    render = functools.partial(defocus.render_defocus, image, depth, camera, mode=mode,
                               sigma_tolerance=float(tolerance) if tolerance else None)
    first = measure.time_steps(render, steps=1, warmup=0)['median_s']
    median = measure.time_steps(render, steps=repeats, warmup=0)['median_s']
    print(f'{variant}: {median:.3f} s per frame (median of {repeats}; first call with '
          f'compilation {first:.2f} s)')


def measure_prepare(size: tuple[int, int], worker_counts: Sequence[int], num_frames: int,
                    cores: int) -> None:
  camera = defocus.camera_preset('nyu')
  render = functools.partial(nyu.render_example, camera=camera, mode='d3net',
                             sigma_tolerance=0.0)
  frames = [(i, *synthetic_defocus.room_scene(*size, seed=i)) for i in range(num_frames)]
  print(f'{num_frames} {size[0]}x{size[1]} NYU-like frames, mode d3net, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  steady = {}
  for workers in worker_counts:
    start = time.perf_counter()
    done = [time.perf_counter() - start for _ in common.map_in_order(render, frames, workers)]
    # Past the start-up (spawning, imports, compilation), every worker is busy.
    steady[workers] = (num_frames - workers) / (done[-1] - done[workers - 1])
    print(f'{workers} worker(s): {num_frames / done[-1]:.2f} frames/s overall, first frame after '
          f'{done[0]:.1f} s; {steady[workers]:.2f} frames/s once started '
          f'({steady[workers] / workers:.2f} per worker)')
  # What the writing process does for every frame, besides reading it from the source file.
  _, example = render(frames[0])
  features = common.defocus_features(size, size)
  serializer = tfds.core.example_serializer.ExampleSerializer(features.get_serialized_info())
  serializer.serialize_example(features.encode_example(example))
  start = time.perf_counter()
  for _ in range(5):
    serializer.serialize_example(features.encode_example(example))
  writer = (time.perf_counter() - start) / 5
  most = max(steady)
  estimate = min(cores * steady[most] / most, 1 / writer)
  print(f'writer: {1e3 * writer:.0f} ms per frame (encoding the depth, serialising). Estimate '
        f'for {cores} cores: {estimate:.1f} frames/s, {NYU_FRAMES} frames (NYU) in '
        f'{NYU_FRAMES / estimate / 60:.1f} min plus start-up')


def measure_blur_map(size: tuple[int, int], repeats: int) -> None:
  aif, depth = synthetic_defocus.room_scene(*size)
  camera = defocus.CAMERAS['nyu']
  example = {'image': defocus.render_defocus(aif, depth, camera, mode='d3net',
                                             sigma_tolerance=0.0),
             'aif': aif, 'depth': depth, 'camera': common.camera_features(camera), 'index': 0}
  features = common.defocus_features(size, size)
  stored = features.encode_example(example)
  example_bytes = sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes
                      for k, v in stored.items() if k != 'camera')
  blur = input_pipeline.blur_map(depth, input_pipeline.camera_array(example))
  blur_feature = tfds.features.Tensor(shape=size, dtype=np.float32,
                                      encoding=tfds.features.Encoding.ZLIB)
  blur_bytes = len(blur_feature.encode_example(blur))

  def best_of(fn):
    return measure.time_steps(fn, steps=repeats, warmup=0)['min_s']

  encoded = blur_feature.encode_example(blur)
  decode = lambda: np.frombuffer(zlib.decompress(encoded), np.float32).reshape(size)
  compute = lambda: input_pipeline.blur_map(depth, input_pipeline.camera_array(example))
  np.testing.assert_array_equal(decode(), compute())
  print(f'{size[0]}x{size[1]} NYU-like frame: example {example_bytes / 1e3:.0f} kB stored (PNGs '
        f'and zlib depth); a stored blur map would add {blur_bytes / 1e3:.0f} kB '
        f'(+{100 * blur_bytes / example_bytes:.0f}%; the depth it derives from takes '
        f'{len(stored["depth"]) / 1e3:.0f} kB). Reading it back (zlib): '
        f'{1e3 * best_of(decode):.2f} ms; computing it from depth and camera: '
        f'{1e3 * best_of(compute):.2f} ms (best of {repeats}).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runtime.skip_unused_cuda_check()
  size = tuple(int(n) for n in _FRAME_SIZE.value)
  if len(size) != 2:
    raise app.UsageError(f'--frame_size takes a height and a width, got {_FRAME_SIZE.value}.')
  if _MEASURE.value == 'blur_map':
    measure_blur_map(size, _REPEATS.value)
  elif _MEASURE.value == 'render':
    # One core, one XLA thread: set before JAX's backend starts (it has not: nothing ran yet).
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    runtime.add_xla_flag('--xla_cpu_multi_thread_eigen=false')
    measure_render(size, _VARIANTS.value, _REPEATS.value)
  else:
    workers = [int(w) for w in _WORKERS.value]
    if min(workers) < 1 or _FRAMES.value <= max(workers):
      raise app.UsageError('--workers must be >= 1 and --frames more than the most workers.')
    measure_prepare(size, workers, _FRAMES.value, _ESTIMATE_CORES.value)


if __name__ == '__main__':
  app.run(main)
