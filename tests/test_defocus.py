"""Thin-lens sigma and the layered renderer, against independent numpy/scipy computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from hded_jax import defocus

NYU = defocus.CAMERAS['nyu']
H, W = 48, 64


def reference_render(image, depth, camera, step=10 / 255, window=21, radius=4):
  """D3-Net's refoc_image.m, layer by layer in float64 (symmetric borders, as documented)."""
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


def test_sigma_matches_spec_table():
  depths = np.array([0.5, 1, 1.5, 2, 3, 5, 10])
  expected = [6.5, 2.2, 0.7, 0, 0.7, 1.3, 1.7]
  np.testing.assert_array_equal(np.round(defocus.blur_sigma_px(depths, NYU), 1), expected)
  sigma = defocus.blur_sigma_px(jnp.asarray(depths, jnp.float32), NYU)
  assert isinstance(sigma, jax.Array)
  np.testing.assert_allclose(np.round(np.asarray(sigma), 1), expected, atol=1e-6)


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


@pytest.mark.parametrize('distance', [0.5, 1.5, 3.0])
def test_constant_depth_is_a_gaussian_blur(scene, distance):
  image, _ = scene
  depth = np.full((H, W), distance, np.float32)
  out = defocus.render_defocus(image, depth, NYU)
  # D3-Net blurs a layer with the sigma of its mid-depth; layers start 0.5 m before min(d).
  step = 10 / 255
  mid_depth = distance - 0.5 + (np.floor(0.5 / step) + 0.5) * step
  sigma = float(defocus.blur_sigma_px(mid_depth, NYU)) + 1e-4
  expected = ndimage.gaussian_filter(image.astype(np.float64), (sigma, sigma, 0),
                                     truncate=10 / sigma, mode='reflect')
  assert isinstance(out, np.ndarray) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=2e-5)


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
  with pytest.raises(ValueError, match='Unknown psf'):
    defocus.render_defocus(image, depth, NYU, psf='box')
  with pytest.raises(ValueError, match='raise max_layers'):
    defocus.render_defocus(image, depth, NYU, max_layers=64)
