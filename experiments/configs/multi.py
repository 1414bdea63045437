"""Case 4: up to two digits of any class, or an empty canvas: the count, and each digit's
class and box.

Run:  python -m experiments.train --config=experiments/configs/multi.py --workdir=runs/multi
"""

from experiments.configs import scene_base


def get_config():
  config = scene_base.get_config()  # K = 2, counts 0/1/2 equally likely, classes predicted
  # BatchNorm after every 3x3 conv: it won on this case at the README's budget (docs/results.md)
  config.dense.norm = "batch"
  return config
