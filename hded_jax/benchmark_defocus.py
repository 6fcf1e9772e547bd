r"""Times ``render_defocus`` on a 480x640 NYU-like frame (depths 0.5-10 m) on one CPU core.

  python -m hded_jax.benchmark_defocus [--tolerances 0.05,0] [--repeats 5]

The process pins itself to one core and asks XLA for one thread before JAX starts.
"""

import argparse
import os
import time

os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from scipy import ndimage  # pylint: disable=g-import-not-at-top,wrong-import-position

from hded_jax import defocus  # pylint: disable=g-import-not-at-top,wrong-import-position


def nyu_like_frame(height=480, width=640, seed=0):
  """A room: floor rising to a back wall at 10 m, a side wall from 0.5 m, a box at 1.2 m."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width].astype(np.float32)
  floor = 1.2 * 520 / np.maximum(rows - height / 3, 1e-3)
  side_wall = 0.5 + 9.5 * (cols / (width / 3))**2
  depth = np.clip(np.minimum(floor, side_wall), 0.5, 10.0)
  depth[200:400, 300:450] = 1.2
  texture = sum(ndimage.zoom(rng.random((height // s, width // s, 3)), (s, s, 1), order=1)
                for s in (1, 4, 16)) / 3
  return texture.astype(np.float32), depth.astype(np.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--tolerances', default='0.05,0',
                      help='comma-separated sigma_tolerance values; 0 is the exact model')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  image, depth = nyu_like_frame()
  camera = defocus.CAMERAS['nyu']
  print(f'480x640 frame, depth {depth.min():.2f}-{depth.max():.2f} m, CPU core '
        f'{sorted(os.sched_getaffinity(0))}')
  for tolerance in map(float, args.tolerances.split(',')):
    start = time.perf_counter()
    defocus.render_defocus(image, depth, camera, sigma_tolerance=tolerance)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      defocus.render_defocus(image, depth, camera, sigma_tolerance=tolerance)
      times.append(time.perf_counter() - start)
    print(f'sigma_tolerance={tolerance}: {np.median(times):.3f} s per frame (median of '
          f'{args.repeats}; first call with compilation {first:.2f} s)')


if __name__ == '__main__':
  main()
