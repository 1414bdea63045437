"""The members of a run (`spec.members`) and where they start: each one model with its
spec, workdir, checkpoints and log; whether the workdir holds a run to resume
(`decide_resume`); and the train states they start from (new, or restored from the newest
checkpoint every member can read).
"""

import functools
import os
import tempfile
import time

import jax
from absl import logging

from jaxloc import checkpoint, configs, records, workdir
from jaxloc import train_state as ts
from jaxloc.spec import Spec

# Fields that may change when a run is resumed: they change neither the model, the data nor
# the optimizer (more epochs continue training, under a constant step size).
RESUMABLE_CHANGES = frozenset(
  {
    "epochs",
    "log_every",
    "num_plot",
    "eval_batch_size",
    "steps_per_call",
    "mnist_dir",
    "checkpoint_every",
    "keep_checkpoints",
    "replica_mode",
  }
)


def resumable_changes(spec: Spec) -> frozenset[str]:
  """RESUMABLE_CHANGES, less `epochs` under a decaying schedule (laid out over all epochs,
  so changing them would change the past)."""
  return RESUMABLE_CHANGES - ({"epochs"} if spec.opt.lr_schedule != "constant" else set())


def decide_resume(spec: Spec, work_dir: str, latest, *, fresh, finished_file=workdir.METRICS):
  """`workdir.resume_step` for this spec: a new run (None), the step to resume from, or a
  refusal; `latest` is the newest checkpoint's step (None: none)."""
  if spec.opt.lr_schedule == "constant":
    ended = "raise --config.epochs to train on"
  else:
    ended = f"its {spec.opt.lr_schedule} learning-rate schedule has ended"
  return workdir.resume_step(
    work_dir,
    spec.fields,
    latest,
    spec.schedule.total_steps,
    fresh=fresh,
    resumable=resumable_changes(spec),
    upgrade=configs.upgrade,
    ended=ended,
    finished_file=finished_file,
  )


class Member:
  """One trained model of the run: its spec, workdir, checkpoints and (once open) log."""

  def __init__(self, spec: Spec, work_dir: str, mngr):
    self.spec, self.work_dir, self.mngr = spec, work_dir, mngr
    self.out_dir = self.log = self.epoch_means = None
    self.save_s = 0.0  # time spent writing checkpoints

  def save(self, state) -> None:
    t = time.perf_counter()
    checkpoint.save(self.mngr, state)
    self.save_s += time.perf_counter() - t

  def open(self, task, val, resume_step, echo) -> None:
    """config.json and the log. Multi-host: only process 0 writes logs, plots and metrics;
    the others write theirs to a throwaway directory (all take part in checkpoints)."""
    main_process = jax.process_index() == 0
    self.out_dir = self.work_dir if main_process else tempfile.mkdtemp(prefix="jaxloc-")
    os.makedirs(self.out_dir, exist_ok=True)
    workdir.write_json(os.path.join(self.out_dir, workdir.CONFIG), self.spec.fields)
    plot = functools.partial(task.plot_predictions, self.out_dir, val)
    self.log = records.Log(self.out_dir, resume_step, main_process, echo, plot)


def keys(spec: Spec) -> tuple[jax.Array, jax.Array]:
  """(init_key, data_key) of the run: its parameters' and its batches' randomness."""
  init_key, data_key = jax.random.split(jax.random.key(spec.seed))
  return init_key, data_key


def initial_states(members, task, work_dir, resume_step, fresh, echo):
  """(states, step): new train states, or each member's newest readable checkpoint at or
  before `resume_step` (all members at one step). With `fresh`, a run one of whose
  members has no readable checkpoint is moved aside."""
  states = [ts.create_train_state(keys(m.spec)[0], m.spec, task.model) for m in members]
  if resume_step is None:
    return states, None
  restore = lambda step: [
    checkpoint.restore_readable(m.mngr, s, step, echo) for m, s in zip(members, states, strict=True)
  ]
  try:
    restored = restore(resume_step)
    step = min(s for s, _ in restored)
    if any(s != step for s, _ in restored):  # a member fell back further: all go back there
      restored = restore(step)
  except checkpoint.Unreadable:
    if not fresh:
      raise
    logging.warning("moved the previous run in %s to %s", work_dir, workdir.move_aside(work_dir))
    for m in members:
      m.mngr.reload()
    return states, None
  logging.info("resumed from step %d", step)
  return [s for _, s in restored], step
