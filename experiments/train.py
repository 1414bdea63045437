"""Trains one experiment: python -m experiments.train --config=CONFIG.py --workdir=DIR.

A workdir that holds checkpoints of the same config is resumed; `--fresh` moves
an incompatible or finished run aside (DIR.old-<time>) and starts over.
"""

import jax
from absl import flags
from ml_collections import config_flags

from experiments import cli
from jaxloc import configs, train
from jaxloc.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string(
  "workdir", None, "Directory for config, metrics, checkpoints, plots."
)
_FRESH = flags.DEFINE_bool("fresh", False, "Move an existing incompatible run aside, start over.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Multi-process: call jax.distributed.initialize(); on SLURM, Open MPI and Cloud TPU it finds "
  "the cluster in the environment, elsewhere give the three flags below.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "--distributed: host:port of process 0, the same for all."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--distributed: processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--distributed: this process, 0..N-1.")
flags.mark_flags_as_required(["config", "workdir"])


def _start_distributed() -> None:
  """jax.distributed.initialize with the flags, when --distributed; mistakes as UserError."""
  cluster = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if not _DISTRIBUTED.value:
    if any(v is not None for v in cluster):
      raise UserError("--coordinator_address, --num_processes, --process_id need --distributed")
    return
  try:
    jax.distributed.initialize(*cluster)
  except (ValueError, RuntimeError) as e:
    raise UserError(
      f"could not start the distributed run ({type(e).__name__}: {str(e)[:300]}). Outside "
      "SLURM, Open MPI and Cloud TPU, give --coordinator_address=HOST:PORT of process 0, "
      "--num_processes and --process_id on every process"
    ) from None


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  _start_distributed()  # before anything initialises JAX's backend
  spec = configs.read(_CONFIG.value)
  if jax.process_index() == 0:
    print(f"config {flags.FLAGS['config'].config_filename} -> workdir {_WORKDIR.value}")
  train.train_and_evaluate(spec, _WORKDIR.value, fresh=_FRESH.value)


if __name__ == "__main__":
  cli.run(main)
