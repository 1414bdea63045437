"""Case 1: one fixed digit class (default 1): is it on the canvas, and where?

Run:  python -m experiments.train --config=experiments/configs/single.py --workdir=runs/single

A canvas holds the target digit (50%), a digit of another class (25%) or nothing
(25%). Targets: presence of the target class and its box when present.
"""

from experiments.configs import scene_base


def get_config():
  config = scene_base.get_config()
  sc = config.scene
  sc.max_objects = 1
  sc.count_probs = (0.5, 0.5)  # target absent / present
  sc.target_class = 1
  sc.distractor_prob = 0.5  # half the target-free canvases show another digit
  sc.classify = False
  # Chosen on training scenes (`python -m experiments.threshold` on the 1,000-step run of the
  # README): count accuracy 0.9575 at the scene default 0.15, best 0.988 at 0.45. A digit of
  # another class must score low here, which takes a higher threshold than counting digits.
  config.dense.score_threshold = 0.45
  # BatchNorm after every 3x3 conv: it won on this case at the README's budget (docs/results.md)
  config.dense.norm = "batch"
  return config
