"""The seed's task shrunk to seconds: for tests and for trying the commands.

  python -m experiments.train --config=experiments/configs/smoke.py --workdir=runs/smoke

2 epochs of 3 steps of batch 8, 40 validation canvases, a record at each epoch's end (one
compiled step program; a record every 2 of the 3 steps would need programs of 1 and 2
steps): it checks that everything runs and writes its outputs, not that the model learns.
"""

from experiments.configs import digit


def get_config():
  config = digit.get_config()
  config.epochs = 2
  config.steps_per_epoch = 3
  config.batch_size = 8
  config.num_val = 40
  config.eval_batch_size = 16
  config.log_every = 3
  config.num_plot = 4
  return config
