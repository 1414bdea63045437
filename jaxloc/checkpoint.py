"""Orbax checkpoints of the train state in `workdir/checkpoints/`, for exact resume.

A checkpoint holds the whole `TrainState` pytree: parameters, Adam state, step and
the moving average of the parameters (when `config.ema_decay` > 0). Because batch t
is a function of (seed, t) alone, restoring the state of step t and continuing gives
bit-for-bit the run that was never interrupted. Saving is synchronous, so a checkpoint
on disk is always complete (Orbax commits it by renaming a temporary directory).
"""

import os

import jax
import orbax.checkpoint as ocp


def manager(work_dir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(work_dir), "checkpoints"), options=options
  )


def save(mngr: ocp.CheckpointManager, state) -> None:
  mngr.save(int(state.step), args=ocp.args.StandardSave(state), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like, step: int):
  """The state saved at `step`, with the structure, shapes and dtypes of `like`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
