"""Case 2: 0, 1 or 2 digits of any class: is any digit present, and where is each?

Run:  python -m experiments.train --config=experiments/configs/presence.py --workdir=runs/presence
"""

from experiments.configs import scene_base


def get_config():
  config = scene_base.get_config()
  config.scene.classify = False
  return config
