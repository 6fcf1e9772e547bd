"""Thin-lens sigma and the layered renderer, against independent numpy/scipy computations."""

import dataclasses
import functools
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from hded_jax import defocus
from tests.fixtures import d3net_matlab as matlab
from tfds_builders import synthetic_defocus

NYU = defocus.CAMERAS['nyu']
H, W = 48, 64


def reference_render(image, depth, camera, step=10 / 255, window=21, radius=4):
  """D3-Net's layering in float64 with the clean mode's symmetric borders and round disk."""
  lo, hi = depth.min() - 0.5, depth.max() + 0.5
  edges = lo + step * np.arange(int((hi - lo) // step) + 1)
  t = np.arange(window) - window // 2
  yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  disk = xx**2 + yy**2 <= radius**2
  out, visibility = np.zeros(image.shape), np.ones(depth.shape)
  for near, far in zip(edges[:-1], edges[1:]):
    mask = (depth >= near) & (depth < far)
    if not mask.any():
      continue
    mask = ndimage.binary_dilation(mask, disk).astype(np.float64)
    sigma = 15e-3 / 2.8 * 0.3 / (1 / 15e-3 - 1 / 2.0) * abs(-2 / (near + far) + 0.5) / 5.6e-6
    psf = np.exp(-(t[:, None]**2 + t[None]**2) / (2 * (sigma + 1e-4)**2))
    psf /= psf.sum()
    blur = lambda x: ndimage.convolve(x, psf, mode='reflect')  # pylint: disable=cell-var-from-loop
    out += np.stack([blur(mask * image[..., c]) for c in range(3)], -1) * visibility[..., None]
    visibility *= 1 - blur(mask)
  return out


@pytest.fixture(scope='module')
def scene():
  """Texture at several scales over a slanted 0.5-10 m ramp, with a near box occluding it."""
  rng = np.random.default_rng(0)
  image = 0.5 * rng.random((H, W, 3)) + 0.5 * ndimage.zoom(
      rng.random((H // 8, W // 8, 3)), (8, 8, 1), order=1)
  xx = np.arange(W)[None, :].repeat(H, 0)
  depth = 0.5 + 9.5 * (xx / (W - 1))**1.5
  depth[6:42, 26:60] = 0.8
  return image.astype(np.float32), depth.astype(np.float32)


def test_sigma_matches_d3net_table():
  depths = np.array([0.5, 1, 1.5, 2, 3, 5, 10])
  expected = [6.5, 2.2, 0.7, 0, 0.7, 1.3, 1.7]
  np.testing.assert_array_equal(np.round(defocus.blur_sigma_px(depths, NYU), 1), expected)
  sigma = defocus.blur_sigma_px(jnp.asarray(depths, jnp.float32), NYU)
  assert isinstance(sigma, jax.Array)
  np.testing.assert_allclose(np.round(np.asarray(sigma), 1), expected, atol=1e-6)


def test_signed_sigma_tells_the_sides_of_the_focal_plane_apart():
  depths = np.array([0.5, 1.0, 2.0, 3.0, 10.0])
  signed = defocus.signed_blur_sigma_px(depths, NYU)
  np.testing.assert_array_equal(np.abs(signed), defocus.blur_sigma_px(depths, NYU))
  assert (signed[:2] < 0).all() and signed[2] == 0 and (signed[3:] > 0).all()
  # sigma = scale · |1/d_f - 1/d|; halving the pixel size doubles it.
  np.testing.assert_allclose(signed, defocus.blur_scale_px(NYU) * (0.5 - 1 / depths))
  half = dataclasses.replace(NYU, pixel_size=NYU.pixel_size / 2)
  np.testing.assert_allclose(defocus.signed_blur_sigma_px(depths, half), 2 * signed)


def test_make3d_preset_blur_keeps_changing_out_to_80m():
  sigma = defocus.blur_sigma_px(np.array([1.0, 5.0, 10.0, 20.0, 40.0, 80.0]), defocus.CAMERAS[
      'make3d'])
  assert sigma[0] < 10.5  # inside the 21x21 window
  assert sigma[1] == 0 and np.all(np.diff(sigma[1:]) > 0.1)


def test_camera_presets_and_validation():
  camera = defocus.camera_preset('nyu', focus_distance=4.0)
  assert camera.focus_distance == 4.0 and camera.focal_length == NYU.focal_length
  assert camera.as_dict() == dict(focal_length=0.015, f_number=2.8, pixel_size=5.6e-6,
                                  focus_distance=4.0)
  with pytest.raises(ValueError, match='Unknown camera preset.*make3d'):
    defocus.camera_preset('kitti')
  with pytest.raises(ValueError, match='must exceed focal_length'):
    dataclasses.replace(NYU, focus_distance=0.01)
  with pytest.raises(ValueError, match='positive'):
    dataclasses.replace(NYU, f_number=0.0)


def layer_mid_depth(distance, step=10 / 255):
  """The depth whose sigma blurs a constant-depth frame: D3-Net blurs a layer with the sigma of
  its mid-depth, and layers start 0.5 m before min(d)."""
  return distance - 0.5 + (np.floor(0.5 / step) + 0.5) * step


@pytest.mark.parametrize('distance', [0.5, 1.5, 3.0])
def test_constant_depth_is_a_gaussian_blur(scene, distance):
  image, _ = scene
  depth = np.full((H, W), distance, np.float32)
  out = defocus.render_defocus(image, depth, NYU)
  sigma = float(defocus.blur_sigma_px(layer_mid_depth(distance), NYU)) + 1e-4
  expected = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0),
                                     truncate=10 / sigma, mode='reflect')
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize('psf', defocus.PSFS)
def test_scale_blurs_each_axis_in_its_own_pixels(scene, psf):
  """An image resized from the camera's resolution by (sy, sx): the PSF's size along each axis
  is the camera's times that axis's factor; equal factors are an isotropic camera."""
  image, _ = scene
  depth = np.full((H, W), 0.6, np.float32)
  render = functools.partial(defocus.render_defocus, image, depth, psf=psf, sigma_tolerance=0)
  # 0.5 x 0.5 of the NYU camera's pixels = pixels twice as large.
  coarse = dataclasses.replace(NYU, pixel_size=2 * NYU.pixel_size)
  np.testing.assert_allclose(render(NYU, scale=(0.5, 0.5)), render(coarse), atol=1e-6)
  anisotropic = render(NYU, scale=(0.6, 0.3))
  if psf == 'gaussian':
    sigma = float(defocus.blur_sigma_px(layer_mid_depth(0.6), NYU))
    expected = ndimage.gaussian_filter(
        image.astype(np.float64), (0.6 * sigma + 1e-4, 0.3 * sigma + 1e-4, 0),
        radius=(10, 10, 0), mode='reflect')  # The 21x21 window.
    np.testing.assert_allclose(anisotropic, expected, atol=2e-5)
  # A point's image is the PSF: twice as wide along rows as along columns.
  point = np.zeros((H, W, 3), np.float32)
  point[H // 2, W // 2] = 1
  psf_image = defocus.render_defocus(point, depth, NYU, psf=psf, scale=(0.6, 0.3))[..., 0]
  rows, cols = np.mgrid[:H, :W] - np.array([H // 2, W // 2])[:, None, None]
  spread = lambda offsets: (psf_image * offsets**2).sum() / psf_image.sum()
  assert spread(rows) / spread(cols) == pytest.approx(4, rel=0.15)
  with pytest.raises(ValueError, match='two positive factors'):
    render(NYU, scale=(1.0, 0.0))


def test_exact_mode_matches_reference(scene):
  image, depth = scene
  out = defocus.render_defocus(image, depth, NYU, sigma_tolerance=0)
  np.testing.assert_allclose(out, reference_render(image, depth, NYU), atol=5e-6)


def test_merged_layers_stay_close_to_reference(scene):
  image, depth = scene
  diff = np.abs(defocus.render_defocus(image, depth, NYU) - reference_render(image, depth, NYU))
  # Identical where layers are wide (near the camera and the box); see the module docstring.
  assert diff[:, :10].max() < 1e-5 and diff[12:36, 32:54].max() < 1e-5
  assert diff.mean() < 2.5 / 255 and diff.max() < 0.16


def test_occlusion_near_layers_cover_far_ones(scene):
  image, _ = scene
  # An in-focus box in front of a blurred 10 m wall: the box stays exactly sharp.
  depth = np.full((H, W), 10.0, np.float32)
  depth[10:40, 20:50] = NYU.focus_distance
  out = defocus.render_defocus(image, depth, NYU)
  np.testing.assert_allclose(out[10:40, 20:50], image[10:40, 20:50], atol=1e-6)
  assert np.abs(out[:, :10] - image[:, :10]).mean() > 0.02
  # A blurred 0.6 m box in front of the in-focus plane: its blur spills over the background
  # next to it, while the background far from it stays sharp.
  depth = np.full((H, W), NYU.focus_distance, np.float32)
  depth[10:40, 20:40] = 0.6
  out = defocus.render_defocus(image, depth, NYU)
  assert np.abs(out[20:30, 42:46] - image[20:30, 42:46]).min() > 0
  np.testing.assert_allclose(out[:, 58:], image[:, 58:], atol=1e-6)


def test_uint8_in_uint8_out(scene):
  image, depth = scene
  image8 = np.round(image * 255).astype(np.uint8)
  out = defocus.render_defocus(image8, depth, NYU)
  assert out.dtype == np.uint8
  expected = defocus.render_defocus(image8.astype(np.float32) / 255, depth, NYU)
  assert np.abs(out.astype(np.float32) - expected * 255).max() <= 0.5 + 1e-3


def test_runs_under_jit_with_traced_camera(scene):
  image, depth = scene
  render = jax.jit(defocus.render_defocus)
  camera = defocus.camera_preset('nyu', focus_distance=4.0)
  out = render(jnp.asarray(image), jnp.asarray(depth), camera)
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(out, defocus.render_defocus(image, depth, camera), atol=1e-6)


def test_disk_psf_is_the_blur_circle():
  # A point at constant depth renders as the PSF itself: a disk of radius sigma / 0.6.
  image = np.zeros((H, W, 3), np.float32)
  image[24, 32] = 1
  out = defocus.render_defocus(image, np.full((H, W), 0.7, np.float32), NYU, psf='disk')
  radius = float(defocus.blur_sigma_px(0.7, NYU)) / 0.6
  area = (out[..., 0] > 0).sum()
  assert np.pi * (radius - 0.5)**2 < area < np.pi * (radius + 1)**2
  np.testing.assert_allclose(out.sum((0, 1)), 1, rtol=1e-5)
  lit = np.argwhere(out[..., 0] > 0)
  assert np.hypot(*(lit - [24, 32]).T).max() <= radius + 1


def test_bad_inputs_raise_clear_errors(scene):
  image, depth = scene
  with pytest.raises(ValueError, match='fill invalid'):
    defocus.render_defocus(image, np.where(depth > 5, 0, depth), NYU)
  with pytest.raises(ValueError, match=r'Expected aif \(H, W, 3\)'):
    defocus.render_defocus(image[..., :1], depth, NYU)
  with pytest.raises(ValueError, match='Unknown mode'):
    defocus.render_defocus(image, depth, NYU, mode='matlab')
  with pytest.raises(ValueError, match='Unknown psf'):
    defocus.render_defocus(image, depth, NYU, psf='box')
  with pytest.raises(ValueError, match='raise max_layers'):
    defocus.render_defocus(image, depth, NYU, max_layers=64)


# MATLAB's documented outputs, as printed by MATLAB.
MATLAB_STREL_DISK = {
    2: ['00100', '01110', '11111', '01110', '00100'],
    4: ['0011100', '0111110', '1111111', '1111111', '1111111', '0111110', '0011100'],
    5: ['001111100', '011111110', '111111111', '111111111', '111111111', '111111111',
        '111111111', '011111110', '001111100'],
}


@pytest.mark.parametrize('radius', sorted(MATLAB_STREL_DISK))
def test_port_strel_disk_is_matlabs_neighbourhood(radius):
  expected = np.array([[c == '1' for c in row] for row in MATLAB_STREL_DISK[radius]])
  np.testing.assert_array_equal(matlab.strel_disk(radius), expected)


def test_port_builtins_match_matlab():
  # fspecial('gaussian') with its defaults (3x3, sigma 0.5), as MATLAB prints it.
  np.testing.assert_allclose(matlab.fspecial_gaussian(3, 0.5), [
      [0.0113, 0.0838, 0.0113], [0.0838, 0.6193, 0.0838], [0.0113, 0.0838, 0.0113]], atol=5e-5)
  # conv(u, v, 'same') from MATLAB's documentation: an even kernel shows which part is kept.
  u, v = np.array([[-1, 2, 3, -2, 0, 1, 2]]), np.array([[2, 4, -1, 1]])
  np.testing.assert_array_equal(matlab.conv2_same(u, v), [[15, 5, -9, 7, 6, 7, -1]])
  np.testing.assert_array_equal(matlab.conv2_same(np.ones((3, 3)), np.ones((3, 3))),
                                [[4, 6, 4], [6, 9, 6], [4, 6, 4]])  # Zero padding.
  np.testing.assert_array_equal(
      matlab.uint8([2.5, 3.5, -2.5, 254.5, 255.5, 300, np.nan, 0.49]),
      [3, 4, 0, 255, 255, 255, 0, 0])
  # 0:0.1:0.3 ends exactly at 0.3 (it is built from both ends); 0 + 3 * 0.1 does not.
  assert matlab.colon(0, 0.1, 0.3)[[0, 1, 3]].tolist() == [0, 0.1, 0.3] and 3 * 0.1 != 0.3
  assert len(matlab.colon(0, 0.1, 1)) == 11 and len(matlab.colon(0.5, 10 / 255, 1.0)) == 13
  # imdilate ignores what lies outside the image: a corner pixel grows into a clipped octagon.
  corner = np.zeros((6, 6))
  corner[0, 0] = 1
  expected = np.zeros((6, 6))
  expected[:4, :4] = matlab.strel_disk(4)[3:, 3:]
  np.testing.assert_array_equal(matlab.imdilate(corner, matlab.strel_disk(4)), expected)


@pytest.mark.parametrize('radius', range(1, 13))
def test_matlab_disk_is_the_ports_strel_disk(radius):
  np.testing.assert_array_equal(defocus.matlab_disk(radius), matlab.strel_disk(radius))
  np.testing.assert_array_equal(defocus.euclidean_disk(radius), matlab.strel_disk(radius, 0))


def _ramp():
  rng = np.random.default_rng(0)
  depth = np.broadcast_to(np.linspace(0.5, 10, 96, dtype=np.float32), (64, 96))
  return rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), np.array(depth)


def _occlusion_edge():
  rng = np.random.default_rng(1)
  depth = np.full((64, 96), 6.0, np.float32)
  depth[:, :48] = 1.0
  return rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), depth


# Frames on which D3-Net's artefacts show: thin layers along a ramp, a sharp occlusion edge, and
# a room with NYU's depth range (quarter size: the port takes a minute on a full 480x640 frame).
D3NET_FRAMES = {
    'ramp': _ramp,
    'occlusion_edge': _occlusion_edge,
    'room': lambda: synthetic_defocus.room_scene(120, 160),
}


@pytest.fixture(scope='module', params=sorted(D3NET_FRAMES))
def matlab_frame(request):
  """(name, aif, depth, uint8 output of the MATLAB port at focus 2 m)."""
  aif, depth = D3NET_FRAMES[request.param]()
  return request.param, aif, depth, matlab.blur_dataset_frame(aif, depth)


def test_d3net_mode_reproduces_the_matlab_generator(matlab_frame):
  name, aif, depth, expected = matlab_frame
  out = defocus.render_defocus(aif, depth, NYU, mode='d3net')
  diff = np.abs(out.astype(np.int32) - expected)
  print(f'd3net vs MATLAB port, {name}: mean {diff.mean():.4f}, max {diff.max()}')
  assert out.dtype == np.uint8 and diff.mean() <= 0.5 and diff.max() <= 8, name
  assert (diff == 0).mean() > 0.99, name


def test_clean_mode_differs_from_matlab_where_documented(matlab_frame):
  name, aif, depth, expected = matlab_frame
  out = defocus.render_defocus(aif, depth, NYU, mode='clean', sigma_tolerance=0)
  diff = np.abs(out.astype(np.int32) - expected)
  print(f'clean vs MATLAB port, {name}: mean {diff.mean():.3f}, max {diff.max()}, '
        f'max 10 px inside the border {diff[10:-10, 10:-10].max()}')
  # Zero padding darkens MATLAB's border; the octagon changes the interior along depth edges.
  assert diff[:10].max() > 8 and diff[10:-10, 10:-10].max() > 8, name


def test_d3net_mode_other_focus_distances_and_cameras():
  aif, depth = synthetic_defocus.room_scene(48, 64, seed=3)
  for focus in (4.0, 8.0):
    expected = matlab.blur_dataset_frame(aif, depth, focus=focus)
    out = defocus.render_defocus(aif, depth, defocus.camera_preset('nyu', focus), mode='d3net')
    assert np.abs(out.astype(np.int32) - expected).max() <= 1
  make3d = defocus.CAMERAS['make3d']
  expected = matlab.uint8(matlab.refoc_image(
      aif.astype(np.float64), depth * 7.0, 10 / 255, make3d.focus_distance,
      make3d.focal_length, make3d.f_number, make3d.pixel_size))
  out = defocus.render_defocus(aif, depth * 7.0, make3d, mode='d3net')
  assert np.abs(out.astype(np.int32) - expected).max() <= 1


def test_d3net_mode_darkens_the_border_like_conv2():
  image = np.full((H, W, 3), 200, np.uint8)
  depth = np.full((H, W), 0.5, np.float32)  # sigma 6.5 px
  d3net = defocus.render_defocus(image, depth, NYU, mode='d3net')
  assert (defocus.render_defocus(image, depth, NYU, mode='clean') == 200).all()
  assert (d3net[20:-20, 20:-20] == 200).all()
  # An edge pixel keeps the PSF's weight inside the image, a little over half; a corner, its
  # square (the PSF is separable).
  edge, corner = int(d3net[H // 2, 0, 0]), int(d3net[0, 0, 0])
  assert 100 < edge < 115 and abs(corner - edge**2 / 200) <= 1


def test_d3net_mode_runs_under_jit(scene):
  image, depth = scene
  render = jax.jit(functools.partial(defocus.render_defocus, mode='d3net'))
  out = render(jnp.asarray(image), jnp.asarray(depth), NYU)
  np.testing.assert_allclose(out, defocus.render_defocus(image, depth, NYU, mode='d3net'),
                             atol=1e-6)


@pytest.mark.parametrize('flags,expected', [
    (['--variants=clean', '--repeats=1'], r'clean: [\d.]+ s per frame'),
    (['--measure=prepare', '--workers=1', '--frames=2', '--frame_size=48,64'],
     r'1 worker\(s\): [\d.]+ frames/s overall.*\nwriter: \d+ ms per frame.* Estimate for 16 '
     r'cores: [\d.]+ frames/s'),
])
def test_benchmark_program_runs(flags, expected):
  result = subprocess.run([sys.executable, '-m', 'hded_jax.benchmark_defocus', *flags],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=pathlib.Path(__file__).parents[1])
  assert result.returncode == 0, result.stderr
  assert re.search(expected, result.stdout), result.stdout
