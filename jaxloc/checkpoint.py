"""Orbax checkpoints of the train state in `workdir/checkpoints/`, for exact resume.

A checkpoint holds the whole `TrainState` pytree: parameters, Adam state, step, the
moving average of the parameters (when `config.ema_decay` > 0) and the BatchNorm running
statistics (a model with BatchNorm). Because batch t
is a function of (seed, t) alone, restoring the state of step t and continuing gives
bit-for-bit the run that was never interrupted. Saving is synchronous, so a checkpoint
on disk is always complete (Orbax commits it by renaming a temporary directory); a save
that fails leaves the previous checkpoints as they were.

A checkpoint that cannot be read (a damaged or missing file) is moved aside to
`checkpoints/<step>.damaged-<time>`, never deleted, and the next newest one is used.
"""

import contextlib
import os
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from jaxloc.errors import UserError


class Unreadable(UserError):
  """No checkpoint of the run can be read."""


def manager(work_dir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(work_dir), "checkpoints"), options=options
  )


def save(mngr: ocp.CheckpointManager, state) -> None:
  """Saves `state` at its step; a failed write is a `UserError` naming the kept checkpoint."""
  step, kept = int(state.step), mngr.latest_step()
  try:
    with _library_stderr_held():
      mngr.save(step, args=ocp.args.StandardSave(state), force=True)
      mngr.wait_until_finished()
  except Exception as e:  # Orbax and TensorStore wrap the OSError of a full or read-only disk
    raise UserError(
      f"cannot write the checkpoint of step {step} in {mngr.directory} ({reason(e)}); "
      + ("no earlier checkpoint" if kept is None else f"the checkpoint of step {kept} is kept")
      + ". Free disk space or fix the permissions, then run the same command to resume"
    ) from None


def restore(mngr: ocp.CheckpointManager, like, step: int):
  """The state saved at `step`, with the structure, shapes and dtypes of `like`."""
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_readable(mngr: ocp.CheckpointManager, like, newest: int, warn):
  """(step, state) of the newest checkpoint at or before step `newest` that can be read.

  Each unreadable one newer than it is moved aside with one `warn(line)`; when none can
  be read nothing is moved and `Unreadable` says which steps failed and why.
  """
  failed, found = [], None
  with _library_stderr_held() as held:  # one window (one grace wait) for every read tried
    for step in sorted((s for s in mngr.all_steps() if s <= newest), reverse=True):
      try:
        found = step, restore(mngr, like, step)
        break
      except Exception as e:  # damaged files surface as ValueError, UnicodeDecodeError, OSError...
        failed.append((step, reason(e)))
    held["failed"] = bool(failed)
  if found is not None:
    for bad, why in failed:
      path = _move_damaged(mngr, bad)
      warn(
        f"checkpoint of step {bad} cannot be read ({why}); moved to {path}, using step {found[0]}"
      )
    mngr.reload()
    return found
  raise Unreadable(
    f"no checkpoint in {mngr.directory} can be read ("
    + "; ".join(f"step {s}: {why}" for s, why in failed)
    + "). Pass --fresh to move the run aside (nothing is deleted) and start over"
  )


def _move_damaged(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames checkpoint `step` to `<step>.damaged-<time>` (process 0, between barriers)."""
  directory = str(mngr.directory)
  path = os.path.join(directory, f"{step}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxloc damaged {step} before")
  if jax.process_index() == 0:
    os.rename(os.path.join(directory, str(step)), path)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jaxloc damaged {step} after")
  return path


def late_report(e: BaseException | None) -> bool:
  """Whether `e` is Orbax's late report of a checkpoint read or write that already failed and
  was dealt with, which Python prints when nobody retrieves it: an abandoned read collected
  after `restore_readable` moved on to an older checkpoint (raised in Orbax's code), or a
  TensorStore callback into the event loop Orbax closed ("Event loop is closed")."""
  if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
    return True
  seen = set()
  while e is not None and id(e) not in seen:  # e and the exceptions it was raised from
    seen.add(id(e))
    tb = e.__traceback__
    while tb is not None:
      if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    e = e.__cause__ or e.__context__
  return False


def reason(e: BaseException) -> str:
  """What failed, on one short line: the innermost error's type and first line."""
  cause = e.__cause__ or e
  first = (str(cause).strip().splitlines() or [""])[0]
  if len(first) > 200:  # TensorStore names the array and file first, the OS error last
    first = f"{first[:80]} ... {first[-120:]}"
  return f"{type(cause).__name__}: {first}" if first else type(cause).__name__


@contextlib.contextmanager
def _library_stderr_held(grace_s: float = 1.0):
  """Holds back what Orbax and TensorStore print to stderr (file descriptor 2) while saves
  or restores run. When one fails (an exception, or the body sets the yielded dict's
  "failed"), their worker threads print tracebacks of the same error, some shortly after
  (callbacks into a closed event loop): those are waited for and logged at INFO
  (`--verbose` shows them) instead of reaching the user; on success the text is passed
  through."""
  sys.stderr.flush()
  saved = os.dup(2)
  status = {"failed": False}
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = True
    try:
      yield status
      failed = status["failed"]
    finally:
      if failed:
        time.sleep(grace_s)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      text = held.read().decode(errors="replace")
      if failed and text:
        logging.info("output of the failed checkpoint operation:\n%s", text)
      elif text:
        sys.stderr.write(text)
