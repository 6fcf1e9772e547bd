"""The synthetic dataset seen through focus distances drawn from 1.5-3 m, one per training
example: the train step renders each input from the stored all-in-focus image and depth. Depths
(0.5-1.95 m) then lie on both sides of the focal plane, so the same blur can mean two depths unless
the network knows the camera (docs/cameras.md compares):

  python train.py --config=configs/synthetic_cameras.py --workdir=workdirs/cameras
  python train.py --config=configs/synthetic_cameras.py --workdir=workdirs/cameras_input \
      --config.model.camera_input=True
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.dataset.camera.focus_distance = (1.5, 3.0)
  return config
