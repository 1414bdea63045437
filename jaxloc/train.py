"""`train_and_evaluate`, the whole run: the loop around `jaxloc.train_state`'s compiled
steps (scoring is `jaxloc.evaluation`; what the config's task is, `jaxloc.tasks.build`).

The hot loop does no host work per step: each call of the compiled step function
draws its batches on the device (`sample_fn(data_key, step, ...)`, e.g.
`canvas.training_batch`, so batch t depends only on (seed, t)), applies
`steps_per_call` Adam steps, and adds the step metrics to device-side sums that
the host fetches only when it logs.

A run, step by step: `train_and_evaluate` checks the config and builds its task once, lets
`workdir.resume_step` decide between a new run, a resume and a refusal, `_initial_states`
(new, or the newest readable checkpoint), then `_run`: `_train` (epochs of `_train_epoch`:
compiled steps from `train_state.Steps`, a `records.Log` record every `log_every` steps,
checkpoints, a stop on SIGTERM / SIGINT; an `evaluation.RunEvaluation` and an epoch line after each
epoch), `_export` (params.msgpack, the task's plots and files) and metrics.json.

Replicas (`config.replicas` = N > 1): N members, seeds `config.seed + i` and the values
`config.vary` lists (`jaxloc.replicas`), trained in one compiled program
(`train_state.compile_train_steps`); member i is a `_Member` with a normal workdir
`DIR/member-<i>/` (its config: `replicas.member_config`), and DIR holds the run's config.json
and summary.json (mean, std, min, max of every final figure).
"""

import contextlib
import functools
import os
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import serialization

from jaxloc import (
  checkpoint,
  console,
  evaluation,
  model,
  parallel,
  preemption,
  records,
  replicas,
  tasks,
  workdir,
)
from jaxloc import train_state as ts
from jaxloc.errors import UserError

# Fields that may change when a run is resumed: they change neither the model,
# the data nor the optimizer (more epochs continue training).
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
SUMMARY = "summary.json"


def resumable_changes(config: ml_collections.ConfigDict) -> frozenset[str]:
  """RESUMABLE_CHANGES, less `epochs` under a decaying schedule (laid out over all epochs,
  so changing them would change the past)."""
  return RESUMABLE_CHANGES - ({"epochs"} if config.lr_schedule != "constant" else set())


class TrainingDiverged(UserError):
  """The training loss became NaN or infinite."""


def train_and_evaluate(
  config: ml_collections.ConfigDict, work_dir: str, *, fresh=False, echo=console.echo
) -> dict:
  """Trains the config's model, evaluates every epoch, writes the workdir; returns the
  final figures (those of metrics.json; with replicas, those of summary.json).

  A workdir with checkpoints of the same config is resumed from its latest readable one
  (see `workdir.resume_step`; damaged ones are moved aside, `checkpoint.restore_readable`).
  SIGTERM or SIGINT during training saves a checkpoint and raises `errors.Stopped`
  (`jaxloc.preemption`). `echo(line)` receives the console lines (process 0 only).
  """
  tasks.check_config(config)
  replicas.check(config)
  data = tasks.load_data(config)  # before the workdir: bad data writes nothing
  task = tasks.build(config)
  workdir.prepare(work_dir)
  main_process = jax.process_index() == 0
  echo = echo if main_process else _silent
  stacked = config.replicas > 1
  dirs = [os.path.join(work_dir, f"member-{i}") for i in range(config.replicas)]
  dirs = dirs if stacked else [work_dir]
  with contextlib.ExitStack() as stack:
    signals = stack.enter_context(preemption.Signals())
    if main_process:
      stack.enter_context(workdir.lock(work_dir))
    mngrs = [stack.enter_context(checkpoint.manager(d, config.keep_checkpoints)) for d in dirs]
    latest = [m.latest_step() for m in mngrs]  # resume where every member has a checkpoint
    resume_step = workdir.resume_step(
      work_dir,
      config,
      None if None in latest else min(latest),
      fresh=fresh,
      resumable=resumable_changes(config),
      upgrade=tasks.upgrade_config,
      finished_file=SUMMARY if stacked else workdir.METRICS,
    )
    for m in mngrs:
      m.reload()  # --fresh may have moved the old checkpoints aside
    configs = [replicas.member_config(config, i) for i in range(config.replicas)]
    configs = configs if stacked else [config]
    members = [_Member(*m) for m in zip(configs, dirs, mngrs, strict=True)]
    states, resume_step = _initial_states(members, task, work_dir, resume_step, fresh, echo)
    try:
      if stacked and main_process:
        workdir.write_json(os.path.join(work_dir, workdir.CONFIG), config.to_dict())
      return _run(config, work_dir, task, members, states, resume_step, data, echo, signals)
    except OSError as e:  # a full disk or lost permissions while writing logs or outputs
      raise UserError(
        f"cannot write {e.filename or work_dir} ({e.strerror or e}); the files written "
        "before are intact. Free disk space or fix the permissions, then run the same "
        "command to resume"
      ) from None


class _Member:
  """One trained model of the run: its config, workdir, checkpoints and (in `_run`) log."""

  def __init__(self, config, work_dir: str, mngr):
    self.config, self.work_dir, self.mngr = config, work_dir, mngr
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
    workdir.write_json(os.path.join(self.out_dir, workdir.CONFIG), self.config.to_dict())
    plot = functools.partial(task.plot_predictions, self.out_dir, val)
    self.log = records.Log(self.out_dir, resume_step, main_process, echo, plot)


def _initial_states(members, task, work_dir, resume_step, fresh, echo):
  """(states, step): new train states, or each member's newest readable checkpoint at or
  before `resume_step` (all members at one step). With `fresh`, a run one of whose
  members has no readable checkpoint is moved aside."""
  states = [ts.create_train_state(_keys(m.config)[0], m.config, task.model) for m in members]
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


def _keys(config) -> tuple[jax.Array, jax.Array]:
  """(init_key, data_key) of the run: its parameters' and its batches' randomness."""
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  return init_key, data_key


def _silent(line: str) -> None:
  del line


def _step(state) -> int:
  """The step a train state (or the stacked states of replica members) has reached."""
  return int(np.ravel(jax.device_get(state.step))[0])


def _prefixed(echo, prefix: str):
  return lambda line: echo(prefix + line)


def _run(config, work_dir, task, members, states, resume_step, data, echo, signals) -> dict:
  """The run from its initial `states` (new, or restored at `resume_step`): train and
  evaluate, export."""
  t_start = time.perf_counter()
  mesh = parallel.data_mesh()
  mode = replicas.resolve_mode(config.replica_mode) if len(members) > 1 else None
  keys = [_keys(m.config)[1] for m in members]
  hps = [ts.hyperparameters(m.config) for m in members]  # the members' own values
  pick = parallel.stack if mode else (lambda trees: trees[0])
  state, data_key, hp = pick(states), pick(keys), pick(hps)
  state, data_key, hp, (digits, labels, val) = parallel.replicate((state, data_key, hp, data), mesh)
  static = dict(sample_fn=task.sample_fn, loss_fn=task.loss_fn, mesh=mesh, replicas=mode)
  optimizer_fn = functools.partial(ts.optimizer, config)
  steps = ts.Steps(state, (digits, labels, data_key, hp), optimizer_fn=optimizer_fn, **static)
  steps_per_call = tasks.resolve_steps_per_call(config.steps_per_call)
  n_params = model.num_params(states[0].params)
  for line in console.start_lines(config, n_params, steps_per_call, resume_step, mode):
    echo(line)
  for i, m in enumerate(members):
    m.open(task, val, resume_step, echo if mode is None else _prefixed(echo, f"member {i} | "))
  averaged = states[0].ema_params is not None
  scorer = evaluation.RunEvaluation(
    task.make_evaluator, states[0].apply_fn, mesh, val, len(members), averaged
  )
  evaluate = lambda state: scorer(ts.exported_params(state), state.params if averaged else None)
  try:
    state, results = _train(config, state, steps, steps_per_call, members, evaluate, signals)
  finally:
    for m in members:
      m.log.close()
  if results is None:  # resumed at the very end: evaluate the restored state
    results = evaluate(state)
    for m, result in zip(members, results, strict=True):
      m.log.plot(result[1])
  finals = []
  for i, (m, result) in enumerate(zip(members, results, strict=True)):
    state_i = parallel.member(state, i) if mode else state
    final = _export(m.out_dir, task, state_i, val, result, m.log.history)
    final.update(
      num_params=n_params,
      steps=int(state_i.step),
      train_images_per_s=steps.images_per_s(config.batch_size),
      train_s=steps.train_s,
      compile_s=steps.compile_s,
      eval_s=scorer.seconds,
      save_s=m.save_s,
      wall_s=time.perf_counter() - t_start,
      backend=jax.default_backend(),
      devices=jax.device_count(),
      resumed_from_step=resume_step,
    )
    workdir.write_json(os.path.join(m.out_dir, workdir.METRICS), final)
    finals.append(final)
  if mode is None:
    for line in console.end_lines(work_dir, finals[0]):
      echo(line)
    return finals[0]
  images_per_s = steps.images_per_s(config.batch_size) * len(members)
  summary = records.summary(finals, mode, images_per_s, replicas.varied(config))
  if jax.process_index() == 0:
    workdir.write_json(os.path.join(work_dir, SUMMARY), summary)
  for line in console.summary_lines(work_dir, summary, finals):
    echo(line)
  return summary


def _train(config, state, steps, steps_per_call, members, evaluate, signals):
  """Trains from `state.step` to the last epoch, evaluating each member at the end of each;
  returns the final state and the members' last evaluations (None when there was nothing
  left to train)."""
  spe, total = config.steps_per_epoch, config.epochs * config.steps_per_epoch
  step = _step(state)
  for m in members:
    m.epoch_means = records.EpochMeans(m.log.records, step // spe * spe)
  results = None
  bar = console.progress_bar(total, step)
  for epoch in range(step // spe + 1, config.epochs + 1):
    t0, trained0 = steps.train_s, steps.trained
    state = _train_epoch(config, state, epoch, steps, steps_per_call, members, bar, signals)
    seconds = steps.train_s - t0
    images_per_s = (steps.trained - trained0) * config.batch_size / max(seconds, 1e-9)
    results = evaluate(state)
    for m, (summary, per, raw) in zip(members, results, strict=True):
      record = {"step": epoch * spe, "epoch": epoch, **m.epoch_means.means()}
      record.update({f"val/{k}": v for k, v in summary.items()})
      record.update({f"val_raw/{k}": v for k, v in (raw or {}).items()})
      m.log.write(record)
      m.epoch_means = records.EpochMeans([], 0)
      m.log.echo(console.epoch_line(record, config.epochs, images_per_s, seconds))
      m.log.predictions(record["step"], per)
  bar.close()
  return state, results


def _train_epoch(config, state, epoch, steps, steps_per_call, members, bar, signals):
  """The steps of `epoch` from `state.step`: a metrics.jsonl record every `log_every`
  steps, a checkpoint every `checkpoint_every` steps and at the end of training. A stop
  request (`signals`) logs the steps since the last record, saves and raises `Stopped`."""
  stacked = len(members) > 1
  pick = parallel.member if stacked else (lambda tree, i: tree)
  step, epoch_end = _step(state), epoch * config.steps_per_epoch
  total = config.epochs * config.steps_per_epoch
  sums = steps.zeros()

  def save():
    for i, m in enumerate(members):
      m.save(pick(state, i))

  while step < epoch_end:
    next_log = min((step // config.log_every + 1) * config.log_every, epoch_end)
    since_log = 0
    while step < next_log and not signals.poll():
      n = min(steps_per_call, next_log - step)
      state, sums = steps(state, sums, n)
      step, since_log = step + n, since_log + n
      bar.update(n)
    if since_log:
      fetched = steps.fetch(sums)
      for i, m in enumerate(members):
        _log_steps(m, epoch, step, since_log, pick(fetched, i), bar)
    sums = steps.zeros()
    if signals.agree():
      if members[0].mngr.latest_step() != step and step > 0:
        save()
      bar.close()
      raise signals.stopped(step, total)
    if step // config.checkpoint_every > (step - since_log) // config.checkpoint_every or (
      step == total
    ):
      save()
  return state


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
  """params.msgpack (the exported weights), the task's end-of-run plots and files (the
  loop drew predictions.png); the final figures."""
  summary, per, raw = result
  params_bytes = serialization.to_bytes(ts.exported_params(state))
  workdir.write_bytes_atomic(os.path.join(out_dir, workdir.PARAMS), params_bytes)
  task.write_outputs(out_dir, val, per, history)
  final = dict(summary)
  if raw is not None:
    final["raw"] = raw  # the un-averaged weights, for comparison with the seed
  return final
