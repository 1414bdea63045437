"""The seed's task (one digit on a 75x75 canvas, class + box) answered by the dense detector.

Run:  python -m experiments.train --config=experiments/configs/digit75.py --workdir=runs/digit75

`digit128.py` on the seed's 75x75 canvas: batch 64, epochs of 937 steps as the seed's, the
seed's box (the pasted 28x28 patch), the scene cases' optimizer (Adam, cosine schedule
from 3e-3; no weight average needed). Digits are drawn with replacement at uniform
offsets (`sample_scene`), and validation scenes come from the MNIST test digits; the
answer is the top detection. 75 is not a multiple of the stride 8: the model pads the
canvas to 80 (black), the grid is 10x10. The seed's own model and protocol:
experiments/configs/digit.py.
"""

from experiments.configs import digit128


def get_config():
  config = digit128.get_config()
  config.canvas_size = 75
  return config
