"""Crowds: up to 20 digits of any class on a 256x256 canvas, resized to 20-40 px, tight boxes.

Run:  python -m experiments.train --config=experiments/configs/crowd.py --workdir=runs/crowd

Beyond what K slot heads can serve: the dense detector has one heatmap cell per 8x8
pixels (a 32x32 grid) and answers with up to `config.dense.top_k` detections.
"""

from experiments.configs import scene_base


def get_config():
  config = scene_base.get_config()
  config.canvas_size = 256
  config.batch_size = 16  # 4x the pixels of a 128x128 canvas and ~10 digits each: the cost
  # of a step of batch 64 on the 128x128 cases, with 2.5x their digits
  config.num_val = 2000  # validation scenes (each holds about 10 digits)
  sc = config.scene
  sc.max_objects = 20
  sc.count_probs = tuple([1 / 21] * 21)  # 0..20 digits, equally likely
  sc.size_range = (20, 40)
  sc.box_type = "tight"
  # BatchNorm after every 3x3 conv: it won on this case at the README's budget (docs/results.md)
  config.dense.norm = "batch"
  return config
