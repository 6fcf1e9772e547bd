"""NYU Depth v2 labeled (795 train / 654 test) with defocus rendered from its depth maps.

The 1,449 labeled frames are read one at a time from the MATLAB v7.3 (HDF5) file, so the 2.8 GB
file is never loaded whole. The images are rendered with D3-Net's camera (15 mm, f/2.8, 5.6 um
pixels) focused at 2, 4 or 8 m, one builder config per focus distance: `focus_2m` etc. render as
D3-Net's MATLAB generator does (defocus mode 'd3net'), `focus_2m_clean` etc. without its border
darkening and with a round mask dilation (mode 'clean'; see hded_jax/defocus.py).
"""

import dataclasses
import functools

import h5py
import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from etils import epath

from hded_jax import defocus
from tfds_builders import common

LABELED_MAT = 'nyu_depth_v2_labeled.mat'
SPLITS_MAT = 'splits.mat'
MANUAL_FILES = {
    LABELED_MAT: 'http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat',
    SPLITS_MAT: 'http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat',
}


@dataclasses.dataclass
class NyuDefocusConfig(common.DefocusConfig):
  """Focus distance of the rendering camera, and the frame size the features are declared with.
  Every layer renders on its own (no merging), as D3-Net: ~1 s a 480x640 frame on one core."""
  sigma_tolerance: float | None = 0.0
  focus_distance: float = 2.0
  height: int = 480
  width: int = 640


def _focus_config(metres: int, mode: str) -> NyuDefocusConfig:
  return NyuDefocusConfig(
      name=f'focus_{metres}m' + ('' if mode == 'd3net' else f'_{mode}'),
      focus_distance=float(metres), defocus_mode=mode,
      description=f'Rendered with the D3-Net camera focused at {metres} m, defocus mode {mode}.')


class Builder(common.DefocusBuilder):
  """NYU Depth v2 labeled frames, their depth, and a defocused rendering of each."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': "focus_*m render as D3-Net's MATLAB generator does (defocus mode 'd3net'); "
               "1.0.0's images are the new focus_*m_clean configs (mode 'clean').",
  }
  BUILDER_CONFIGS = [_focus_config(m, mode) for mode in defocus.MODES for m in (2, 4, 8)]
  DEFAULT_BUILDER_CONFIG_NAME = 'focus_2m'
  MANUAL_FILES = MANUAL_FILES
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download these two files into the manual folder (`--manual_dir`, default '
      '<data_dir>/downloads/manual/):\n' +
      ''.join(f'  {name}: {url}\n' for name, url in MANUAL_FILES.items()) +
      f'{LABELED_MAT} (2.8 GB, MATLAB v7.3) holds the 1,449 labeled frames; {SPLITS_MAT} holds '
      'the standard 795 / 654 train / test split.')

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        features=common.defocus_features(
            (config.height, config.width), (config.height, config.width)),
        homepage='https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html',
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = common.check_manual_files(dl_manager.manual_dir, MANUAL_FILES, self.name)
    num_frames = _check_labeled_mat(
        paths[LABELED_MAT], (self.builder_config.height, self.builder_config.width))
    splits = read_splits(paths[SPLITS_MAT], num_frames)
    return {split: self._generate_examples(paths[LABELED_MAT], indices, split)
            for split, indices in splits.items()}

  def _generate_examples(self, labeled_mat: epath.Path, indices: np.ndarray, split: str):
    config = self.builder_config
    camera = defocus.camera_preset('nyu', focus_distance=config.focus_distance)
    render = functools.partial(render_example, camera=camera, mode=config.defocus_mode,
                               sigma_tolerance=config.sigma_tolerance)
    with h5py.File(labeled_mat, 'r') as mat:
      frames = ((int(index), *read_frame(mat, index, labeled_mat)) for index in indices)
      yield from common.log_progress(
          common.map_in_order(render, frames, self.num_workers), len(indices),
          f'{self.name}/{config.name} {split}')


def render_example(frame: tuple[int, np.ndarray, np.ndarray], *, camera: defocus.Camera,
                   mode: str, sigma_tolerance: float | None) -> tuple[int, dict]:
  """(index, example) of a frame (index, aif, depth); runs in a worker process."""
  # The labeled depths are in-painted: positive everywhere, as rendering needs.
  return common.rendered_example(*frame, camera, mode=mode, sigma_tolerance=sigma_tolerance)


def _check_labeled_mat(path: epath.Path, frame_size: tuple[int, int]) -> int:
  """Checks the file's layout against MATLAB's (N,3,W,H) / (N,W,H) and returns N."""
  if not h5py.is_hdf5(path):
    raise ValueError(f'{path} is not a MATLAB v7.3 (HDF5) file. Download {LABELED_MAT} from '
                     f'{MANUAL_FILES[LABELED_MAT]} (the labeled-frames file, not the raw dumps).')
  try:
    with h5py.File(path, 'r') as mat:
      missing = {'images', 'depths'} - set(mat.keys())
      if missing:
        raise ValueError(f'{path} has no {sorted(missing)} variable(s); is it {LABELED_MAT}?')
      images, depths = mat['images'].shape, mat['depths'].shape
  except OSError as e:
    raise ValueError(f'{path} cannot be read ({e}): it is truncated or damaged. Download it '
                     f'again from {MANUAL_FILES[LABELED_MAT]} (2.8 GB).') from e
  h, w = frame_size
  if images[1:] != (3, w, h) or depths != (images[0], w, h):
    raise ValueError(
        f'{path}: images {images} / depths {depths} do not match the expected MATLAB layout '
        f'(N, 3, {w}, {h}) / (N, {w}, {h}) for {h}x{w} frames.')
  return images[0]


def read_splits(path: epath.Path, num_frames: int) -> dict[str, np.ndarray]:
  """{'train', 'test'}: 0-based frame indices from the 1-based `trainNdxs` / `testNdxs`."""
  mat = _read_mat_variables(path)
  splits = {}
  for split, key in (('train', 'trainNdxs'), ('test', 'testNdxs')):
    if key not in mat:
      raise ValueError(f'{path} has no {key!r}; download {SPLITS_MAT} from '
                       f'{MANUAL_FILES[SPLITS_MAT]}.')
    indices = np.asarray(mat[key]).ravel().astype(np.int64) - 1
    if not indices.size:
      raise ValueError(f'{path}: {key} is empty, so the {split} split would be; download '
                       f'{SPLITS_MAT} again from {MANUAL_FILES[SPLITS_MAT]}.')
    if indices.min() < 0 or indices.max() >= num_frames:
      raise ValueError(f'{path}: {key} holds indices outside 1..{num_frames}, the frames in '
                       f'{LABELED_MAT}; the two files do not belong together.')
    splits[split] = indices
  if np.intersect1d(splits['train'], splits['test']).size:
    raise ValueError(f'{path}: trainNdxs and testNdxs overlap.')
  return splits


def _read_mat_variables(path: epath.Path) -> dict[str, np.ndarray]:
  """The variables of a MATLAB .mat file, v5 (as published) or v7.3 (HDF5, if re-saved)."""
  if h5py.is_hdf5(path):
    with h5py.File(path, 'r') as mat:
      return {key: np.asarray(value) for key, value in mat.items()
              if isinstance(value, h5py.Dataset)}
  try:
    with path.open('rb') as f:
      return scipy.io.loadmat(f)
  except Exception as e:  # scipy's ValueError, IndexError, MatReadError... on other files.
    raise ValueError(f'{path} is not a MATLAB .mat file ({type(e).__name__}: {e}); download '
                     f'{SPLITS_MAT} again from {MANUAL_FILES[SPLITS_MAT]}.') from e


def read_frame(mat: h5py.File, index: int,
               path: epath.Path) -> tuple[np.ndarray, np.ndarray]:
  """Frame `index` (0-based) of `mat` (opened from `path`) as aif (H,W,3) uint8 and depth (H,W)
  float32 metres."""
  try:
    aif = np.ascontiguousarray(np.transpose(mat['images'][index], (2, 1, 0)))
    depth = np.transpose(mat['depths'][index], (1, 0)).astype(np.float32)
  except OSError as e:
    raise ValueError(f'{path}: frame {index + 1} cannot be read ({e}): the file is damaged. '
                     f'Download it again from {MANUAL_FILES[LABELED_MAT]}.') from e
  return aif, np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)
