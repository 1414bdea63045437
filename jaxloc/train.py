"""`train_and_evaluate(spec, work_dir)`, the whole run: the loop around
`jaxloc.train_state`'s compiled steps (scoring is `jaxloc.evaluation`; the task,
`jaxloc.tasks.build`).

The hot loop does no host work per step: each call of the compiled step function draws its
batches on the device (`sample_fn(data_key, step, ...)`, so batch t depends only on
(seed, t)), applies `steps_per_call` Adam steps, and adds the step metrics to device-side
sums that the host fetches only when it logs.

A run, top to bottom: load the data and build the task; decide between a new run, a resume
and a refusal (`workdir.resume_step`); the initial states (new, or the newest readable
checkpoint); then epochs of steps (a `records.Log` record every `log_every` steps,
checkpoints, a stop on SIGTERM / SIGINT; an evaluation and an epoch line after each epoch);
then params.msgpack, the task's plots and files, and metrics.json.

A run trains N >= 1 members (`spec.members`: N > 1 are replicas, seeds `seed + i` and their
listed values, trained in one compiled program). Member i has a workdir of its own
(`DIR/member-<i>/` for replicas, DIR itself for one member); a replica run's DIR holds its
config.json and summary.json (mean, std, min, max of every final figure).
"""

import contextlib
import os
import time

import jax
import numpy as np
from flax import serialization

from jaxloc import (
  checkpoint,
  console,
  evaluation,
  loaders,
  model,
  parallel,
  preemption,
  records,
  tasks,
  workdir,
)
from jaxloc import spec as specs
from jaxloc import train_state as ts
from jaxloc.errors import UserError
from jaxloc.members import Member, decide_resume, initial_states, keys
from jaxloc.spec import Spec

SUMMARY = "summary.json"


class TrainingDiverged(UserError):
  """The training loss became NaN or infinite."""


def train_and_evaluate(spec: Spec, work_dir: str, *, fresh=False, echo=console.echo) -> dict:
  """Trains the spec's model, evaluates every epoch, writes the workdir; returns the final
  figures (those of metrics.json; with replicas, those of summary.json).

  A workdir with checkpoints of the same config is resumed from its latest readable one
  (see `workdir.resume_step`; damaged ones are moved aside, `checkpoint.restore_readable`).
  SIGTERM or SIGINT during training saves a checkpoint and raises `errors.Stopped`
  (`jaxloc.preemption`). `echo(line)` receives the console lines (process 0 only).
  """
  data = loaders.load(spec)  # before the workdir: bad data writes nothing
  task = tasks.build(spec)
  workdir.prepare(work_dir)
  main_process = jax.process_index() == 0
  echo = echo if main_process else _silent
  member_specs = specs.members(spec)
  stacked = len(member_specs) > 1
  dirs = [os.path.join(work_dir, f"member-{i}") for i in range(len(member_specs))]
  dirs = dirs if stacked else [work_dir]
  with contextlib.ExitStack() as stack:
    signals = stack.enter_context(preemption.Signals())
    if main_process:
      stack.enter_context(workdir.lock(work_dir))
    keep = spec.schedule.keep_checkpoints
    mngrs = [stack.enter_context(checkpoint.manager(d, keep)) for d in dirs]
    latest = [m.latest_step() for m in mngrs]  # resume where every member has a checkpoint
    latest = None if None in latest else min(latest)
    finished_file = SUMMARY if stacked else workdir.METRICS
    resume_step = decide_resume(spec, work_dir, latest, fresh=fresh, finished_file=finished_file)
    for m in mngrs:
      m.reload()  # --fresh may have moved the old checkpoints aside
    members = [Member(*m) for m in zip(member_specs, dirs, mngrs, strict=True)]
    states, resume_step = initial_states(members, task, work_dir, resume_step, fresh, echo)
    try:
      if stacked and main_process:
        workdir.write_json(os.path.join(work_dir, workdir.CONFIG), spec.fields)
      loop = _Loop(spec, task, members, states, data, signals)
      finals = loop.run(resume_step, echo)
      return _finish(spec, work_dir, loop, finals, echo)
    except OSError as e:  # a full disk or lost permissions while writing logs or outputs
      raise UserError(
        f"cannot write {e.filename or work_dir} ({e.strerror or e}); the files written "
        "before are intact. Free disk space or fix the permissions, then run the same "
        "command to resume"
      ) from None


def _silent(line: str) -> None:
  del line


def _step(state) -> int:
  """The step a train state (or the stacked states of replica members) has reached."""
  return int(np.ravel(jax.device_get(state.step))[0])


class _Loop:
  """The members' training on the devices: one (stacked, for replicas) train state, its
  compiled steps and the evaluation of its exported weights."""

  def __init__(self, spec: Spec, task, members: list[Member], states, data, signals):
    self.spec, self.task, self.members, self.signals = spec, task, members, signals
    self.stacked = len(members) > 1
    self.mesh = parallel.data_mesh()
    data_keys = [keys(m.spec)[1] for m in members]
    hps = [ts.step_hyperparameters(m.spec) for m in members]  # the members' own values
    pick = parallel.stack if self.stacked else (lambda trees: trees[0])
    state, data_key, hp = pick(states), pick(data_keys), pick(hps)
    state, data_key, hp, data = parallel.replicate((state, data_key, hp, data), self.mesh)
    digits, labels, self.val = data
    self.state = state
    self.steps = ts.Steps(
      state,
      (digits, labels, data_key, hp),
      sample_fn=task.sample_fn,
      loss_fn=task.loss_fn,
      optimizer_fn=ts.optimizer_fn(spec.opt),
      mesh=self.mesh,
      replicas=spec.replicas.mode if self.stacked else None,
    )
    self.n_params = model.num_params(states[0].params)
    averaged = states[0].ema_params is not None
    self.scorer = evaluation.RunEvaluation(
      task.make_evaluator, states[0].apply_fn, self.mesh, self.val, len(members), averaged
    )
    self.evaluate = lambda state: self.scorer(
      ts.exported_variables(state), ts.raw_variables(state) if averaged else None
    )

  def member_state(self, i: int):
    return parallel.member(self.state, i) if self.stacked else self.state

  def member_tree(self, tree, i: int):
    return parallel.member(tree, i) if self.stacked else tree

  def run(self, resume_step, echo) -> list[dict]:
    """Trains from the initial state to the last step; returns each member's final figures
    (params.msgpack and its outputs written)."""
    t_start = time.perf_counter()
    mode = self.spec.replicas.mode if self.stacked else None
    for line in console.start_lines(self.spec, self.n_params, resume_step, mode):
      echo(line)
    for i, m in enumerate(self.members):
      member_echo = (lambda line, i=i: echo(f"member {i} | {line}")) if self.stacked else echo
      m.open(self.task, self.val, resume_step, member_echo)
    try:
      results = self.train()
    finally:
      for m in self.members:
        m.log.close()
    if results is None:  # resumed at the very end: evaluate the restored state
      results = self.evaluate(self.state)
      for m, result in zip(self.members, results, strict=True):
        m.log.plot(result[1])
    finals = []
    for i, (m, result) in enumerate(zip(self.members, results, strict=True)):
      state = self.member_state(i)
      final = _export(m.out_dir, self.task, state, self.val, result, m.log.history)
      final.update(
        num_params=self.n_params,
        steps=int(state.step),
        train_images_per_s=self.steps.images_per_s(self.spec.data.batch_size),
        train_s=self.steps.train_s,
        compile_s=self.steps.compile_s,
        eval_s=self.scorer.seconds,
        save_s=m.save_s,
        wall_s=time.perf_counter() - t_start,
        backend=jax.default_backend(),
        devices=jax.device_count(),
        resumed_from_step=resume_step,
      )
      workdir.write_json(os.path.join(m.out_dir, workdir.METRICS), final)
      finals.append(final)
    return finals

  def train(self):
    """Trains from `state.step` to the last epoch, evaluating each member at the end of
    each; returns the members' last evaluations (None when nothing was left to train)."""
    sched = self.spec.schedule
    step = _step(self.state)
    for m in self.members:
      m.epoch_means = records.EpochMeans(
        m.log.records, step // sched.steps_per_epoch * sched.steps_per_epoch
      )
    results = None
    bar = console.progress_bar(sched.total_steps, step)
    for epoch in range(step // sched.steps_per_epoch + 1, sched.epochs + 1):
      t0, trained0 = self.steps.train_s, self.steps.trained
      self.train_epoch(epoch, bar)
      seconds = self.steps.train_s - t0
      images = (self.steps.trained - trained0) * self.spec.data.batch_size
      results = self.evaluate(self.state)
      for m, (summary, per, raw) in zip(self.members, results, strict=True):
        record = {"step": epoch * sched.steps_per_epoch, "epoch": epoch, **m.epoch_means.means()}
        record.update({f"val/{k}": v for k, v in summary.items()})
        record.update({f"val_raw/{k}": v for k, v in (raw or {}).items()})
        m.log.write(record)
        m.epoch_means = records.EpochMeans([], 0)
        line = console.epoch_line(record, sched.epochs, images / max(seconds, 1e-9), seconds)
        m.log.echo(line)
        m.log.predictions(record["step"], per)
    bar.close()
    return results

  def train_epoch(self, epoch: int, bar) -> None:
    """The steps of `epoch` from `state.step`: a metrics.jsonl record every `log_every`
    steps, a checkpoint every `checkpoint_every` steps and at the end of training. A stop
    request (`signals`) logs the steps since the last record, saves and raises `Stopped`."""
    sched, steps = self.spec.schedule, self.steps
    step, epoch_end = _step(self.state), epoch * sched.steps_per_epoch
    sums = steps.zeros()
    while step < epoch_end:
      next_log = min((step // sched.log_every + 1) * sched.log_every, epoch_end)
      since_log = 0
      while step < next_log and not self.signals.poll():
        n = min(sched.steps_per_call, next_log - step)
        self.state, sums = steps(self.state, sums, n)
        step, since_log = step + n, since_log + n
        bar.update(n)
      if since_log:
        fetched = steps.fetch(sums)
        for i, m in enumerate(self.members):
          _log_steps(m, epoch, step, since_log, self.member_tree(fetched, i), bar)
      sums = steps.zeros()
      if self.signals.agree():
        if self.members[0].mngr.latest_step() != step and step > 0:
          self.save()
        bar.close()
        raise self.signals.stopped(step, sched.total_steps)
      every = sched.checkpoint_every
      if step // every > (step - since_log) // every or step == sched.total_steps:
        self.save()

  def save(self) -> None:
    for i, m in enumerate(self.members):
      m.save(self.member_state(i))


def _log_steps(member, epoch, step, since_log, fetched, bar) -> None:
  """The record of the `since_log` steps up to `step` (their metric sums `fetched`)."""
  if not np.isfinite(fetched["loss"]):
    raise TrainingDiverged(
      f"training loss is {fetched['loss']} in steps {step - since_log + 1}..{step} of "
      f"{member.work_dir}; the last good checkpoint (step {member.mngr.latest_step()}) is kept. "
      "Lower --config.learning_rate and start a new workdir."
    )
  means = records.means(fetched, since_log)
  member.log.write({"step": step, "epoch": epoch, "steps_averaged": since_log, **means})
  bar.set_postfix(loss=f"{means['train/loss']:.4f}")
  member.epoch_means.add(fetched, since_log)


def _export(out_dir, task, state, val, result, history) -> dict:
  """params.msgpack (the exported weights; batch_stats.msgpack beside it with BatchNorm), the
  task's end-of-run plots and files (the loop drew predictions.png); the final figures."""
  summary, per, raw = result
  params_bytes = serialization.to_bytes(ts.exported_params(state))
  workdir.write_bytes_atomic(os.path.join(out_dir, workdir.PARAMS), params_bytes)
  if state.batch_stats is not None:
    stats_bytes = serialization.to_bytes(state.batch_stats)
    workdir.write_bytes_atomic(os.path.join(out_dir, workdir.BATCH_STATS), stats_bytes)
  task.write_outputs(out_dir, val, per, history)
  final = dict(summary)
  if raw is not None:
    final["raw"] = raw  # the un-averaged weights, for comparison with the seed
  return final


def _finish(spec: Spec, work_dir: str, loop: _Loop, finals: list[dict], echo) -> dict:
  """The run's end lines; a replica run's summary.json. Returns the run's figures."""
  if not loop.stacked:
    for line in console.end_lines(work_dir, finals[0], spec.data.num_plot > 0):
      echo(line)
    return finals[0]
  images_per_s = loop.steps.images_per_s(spec.data.batch_size) * len(finals)
  summary = records.summary(finals, spec.replicas.mode, images_per_s, dict(spec.replicas.varied))
  if jax.process_index() == 0:
    workdir.write_json(os.path.join(work_dir, SUMMARY), summary)
  for line in console.summary_lines(work_dir, summary, finals):
    echo(line)
  return summary
