"""Case 3 on the cases' 128x128 canvas: one digit of 10 classes, class + box.

Run:  python -m experiments.train --config=experiments/configs/digit128.py --workdir=runs/digit128
(The seed's 75x75 protocol is experiments/configs/digit.py.)
"""

from experiments.configs import digit


def get_config():
  config = digit.get_config()
  config.canvas_size = 128
  config.ema_decay = 0.0  # the README's cases table was measured without a moving average
  return config
