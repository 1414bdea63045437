"""Trains one experiment: python -m experiments.train --config=CONFIG.py --workdir=DIR.

A workdir that holds checkpoints of the same config is resumed; `--fresh` moves
an incompatible or finished run aside (DIR.old-<time>) and starts over.
"""

import json

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from jaxloc import train
from jaxloc.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for config, metrics, checkpoints, plots."
)
_FRESH = flags.DEFINE_bool("fresh", False, "Move an existing incompatible run aside, start over.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Multi-host: call jax.distributed.initialize() (cluster from the env)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
  print(json.dumps(final, indent=2, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
