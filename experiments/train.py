"""Trains one experiment: python -m experiments.train --config=CONFIG.py --workdir=DIR.

Errors a user can fix (jaxloc.errors.UserError) are printed on one line with exit status 2.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from jaxloc import train
from jaxloc.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config, metrics, params, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(final, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
