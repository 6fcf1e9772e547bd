"""Make3D (400 train / 134 test outdoor scenes) with defocus rendered from the laser depth.

Orientation: the JPEGs decode (after any EXIF rotation, as OpenCV's imread applies it) to 2272
rows x 1704 columns, a portrait 4:3 frame. `Position3DGrid[..., 3]` loads with scipy as 55 rows
x 305 columns and covers the whole frame, rows with rows: the common Make3D evaluation code
resizes it straight onto the image and crops the same row band from both. So the depth is not
isotropic (about 41 image rows but 6 columns per depth pixel) and is stretched onto the image.

`image` / `aif` are resized to 384x288 (HxW): exactly 4:3 and both sides multiples of 32, as the
network needs. `depth` keeps the native 55x305 grid. Depths at or beyond 70 m are set to 0
(invalid): the standard protocol evaluates only depths below 70 m because the laser's range ends
near 81.9 m, where missed returns (sky) and far points pile up as non-measurements. For the
rendering those pixels count as 70 m (far), and the grid is upsampled bilinearly to the image.
The camera is `hded_jax.defocus`'s 'make3d' preset (focused at 5 m); its pixel size applies at
the 384x288 working size, i.e. blur sigmas are in pixels of `image`. The `384x288` config renders
as D3-Net's MATLAB generator does (defocus mode 'd3net'), `384x288_clean` without its border
darkening and with a round mask dilation (mode 'clean'; see hded_jax/defocus.py).
"""

import dataclasses
import functools
import io
import posixpath
import tarfile
from collections.abc import Iterator

import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image, ImageOps

from hded_jax import defocus
from hded_jax import images
from tfds_builders import common

DATA_PAGE = 'http://make3d.cs.cornell.edu/data.html'
MANUAL_FILES = {
    'Train400Img.tar.gz': f'{DATA_PAGE} (Dataset 1, training images)',
    'Train400Depth.tgz': f'{DATA_PAGE} (Dataset 1, training depths)',
    'Test134.tar.gz': f'{DATA_PAGE} (Dataset 1, test images)',
    'Test134Depth.tar.gz': f'{DATA_PAGE} (Dataset 1, test depths)',
}
# split -> (image archive, depth archive)
SPLIT_ARCHIVES = {
    'train': ('Train400Img.tar.gz', 'Train400Depth.tgz'),
    'test': ('Test134.tar.gz', 'Test134Depth.tar.gz'),
}
IMAGE_NAME = ('img-', '.jpg')
DEPTH_NAME = ('depth_sph_corr-', '.mat')


@dataclasses.dataclass
class Make3dDefocusConfig(common.DefocusConfig):
  """Working image size, native depth grid size (both H, W) and the valid-depth cap in metres.
  Every layer renders on its own (no merging), as D3-Net."""
  sigma_tolerance: float | None = 0.0
  image_size: tuple[int, int] = (384, 288)
  depth_size: tuple[int, int] = (55, 305)
  max_depth: float = 70.0


class Builder(common.DefocusBuilder):
  """Make3D images, their laser depth, and a defocused rendering of each."""

  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '2.0.0': "384x288 renders as D3-Net's MATLAB generator does (defocus mode 'd3net'); "
               "1.0.0's images are the new 384x288_clean config (mode 'clean').",
  }
  BUILDER_CONFIGS = [Make3dDefocusConfig(
      name='384x288' + ('' if mode == 'd3net' else f'_{mode}'), defocus_mode=mode,
      description=f'Images at 384x288 (HxW), depth at its native 55x305, defocus mode {mode}.')
      for mode in defocus.MODES]
  MANUAL_FILES = MANUAL_FILES
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f'Download the four archives of the Make3D Range Image Data (Dataset 1) from {DATA_PAGE} '
      'into the manual folder (`--manual_dir`, default '
      '<data_dir>/downloads/manual/), without unpacking them:\n' +
      ''.join(f'  {name}\n' for name in MANUAL_FILES))

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
        features=common.defocus_features(config.image_size, config.depth_size),
        homepage=DATA_PAGE,
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    paths = common.check_manual_files(dl_manager.manual_dir, MANUAL_FILES, self.name)
    splits = {}
    for split, (image_archive, depth_archive) in SPLIT_ARCHIVES.items():
      depths = {name: self._read_depth(data, f'{depth_archive}:{name}')
                for name, data in archive_files(paths[depth_archive], *DEPTH_NAME)}
      images = [name for name, _ in archive_files(paths[image_archive], *IMAGE_NAME,
                                                  read=False)]
      unpaired = sorted(set(images) ^ set(depths))
      if not images or unpaired:
        raise ValueError(
            f'{image_archive} and {depth_archive} do not pair up: {len(images)} img-*.jpg, '
            f'{len(depths)} depth_sph_corr-*.mat, unpaired name suffixes: {unpaired[:10]}. '
            'Re-download both archives.')
      splits[split] = self._generate_examples(paths[image_archive], depths, split)
    return splits

  def _generate_examples(self, image_archive: epath.Path, depths: dict[str, np.ndarray],
                         split: str):
    config = self.builder_config
    render = functools.partial(
        render_example, image_size=tuple(config.image_size), max_depth=config.max_depth,
        camera=defocus.camera_preset('make3d'), mode=config.defocus_mode,
        sigma_tolerance=config.sigma_tolerance)
    items = ((index, f'{image_archive.name}:{name}', data, depths[name])
             for index, (name, data) in enumerate(archive_files(image_archive, *IMAGE_NAME)))
    yield from common.log_progress(common.map_in_order(render, items, self.num_workers),
                                   len(depths), f'{self.name}/{config.name} {split}')

  def _read_depth(self, data: bytes, where: str) -> np.ndarray:
    grid = scipy.io.loadmat(io.BytesIO(data), variable_names=['Position3DGrid']).get(
        'Position3DGrid')
    size = tuple(self.builder_config.depth_size)
    if grid is None or grid.shape != (*size, 4):
      raise ValueError(f'{where}: expected Position3DGrid of shape {(*size, 4)}, got '
                       f'{None if grid is None else grid.shape}.')
    return grid[..., 3].astype(np.float32)


def render_example(item: tuple[int, str, bytes, np.ndarray], *, image_size: tuple[int, int],
                   max_depth: float, camera: defocus.Camera, mode: str,
                   sigma_tolerance: float | None) -> tuple[int, dict]:
  """(index, example) of an item (index, where, JPEG bytes, depth grid); runs in a worker."""
  index, where, data, depth = item
  aif = read_image(data, image_size, where)
  # NaN or <= 0 means no laser return.
  valid = np.isfinite(depth) & (depth > 0) & (depth < max_depth)
  return common.rendered_example(
      index, aif, np.where(valid, depth, 0).astype(np.float32), camera, mode=mode,
      sigma_tolerance=sigma_tolerance,
      rendering_depth=resize_depth(np.where(valid, depth, max_depth), image_size))


def archive_files(
    path: epath.Path, prefix: str, suffix: str, *, read: bool = True
) -> Iterator[tuple[str, bytes | None]]:
  """(name between prefix and suffix, contents) of matching files in a .tar.gz, in order.

  Streams the archive, so nothing is unpacked to disk.
  """
  try:
    with path.open('rb') as f, tarfile.open(fileobj=f, mode='r|gz') as tar:
      for member in tar:
        base = posixpath.basename(member.name)
        if member.isfile() and base.startswith(prefix) and base.endswith(suffix):
          name = base[len(prefix):-len(suffix)]
          yield name, tar.extractfile(member).read() if read else None
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(f'Cannot read {path} as a .tar.gz archive ({e}); re-download it.') from e


def read_image(data: bytes, size: tuple[int, int], where: str) -> np.ndarray:
  """Decodes a JPEG upright (EXIF applied) and resizes it to size (H, W)."""
  image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert('RGB')
  h, w = size
  if (image.height > image.width) != (h > w):
    logging.warning('%s is %dx%d (HxW), not in the %s orientation Make3D images have; it is '
                    'stretched to %dx%d.', where, image.height, image.width,
                    'portrait' if h > w else 'landscape', h, w)
  return np.asarray(image.resize((w, h), Image.Resampling.BICUBIC))


def resize_depth(depth: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  return images.resize(depth.astype(np.float32), size, Image.Resampling.BILINEAR)
