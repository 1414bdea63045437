"""TrainState, the jitted train step, and `train_and_evaluate`, the whole run (scoring is
`jaxloc.evaluation`; what the config's task is, `jaxloc.tasks.build`).

The hot loop does no host work per step: each call of the compiled step function
draws its batches on the device (`sample_fn(data_key, step, ...)`, e.g.
`canvas.training_batch`, so batch t depends only on (seed, t)), applies
`steps_per_call` Adam steps, and adds the step metrics to device-side sums that
the host fetches only when it logs.

A run, step by step: `train_and_evaluate` checks the config, lets `workdir.resume_step`
decide between a new run, a resume and a refusal, `_initial_state` (new, or the newest
readable checkpoint), then `_run`: `_train` (epochs of `_train_epoch`: compiled steps from
`_Steps`, a `_Log` record every `log_every` steps, checkpoints, a stop on SIGTERM / SIGINT;
an `_Evaluation` and an epoch line after each epoch), `_export` (params.msgpack, the task's
plots and files) and metrics.json.
"""

import contextlib
import functools
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization
from flax.training import train_state

from jaxloc import checkpoint, console, events, losses, model, parallel, preemption, tasks, workdir
from jaxloc.errors import UserError


class TrainState(train_state.TrainState):
  """Flax's TrainState plus `ema_params`, a moving average of `params` (None when off)."""

  ema_params: Any = None


def ema_update(ema_params, params, decay: float, step: jax.Array):
  """One step of the exponential moving average `ema <- d * ema + (1 - d) * params`.

  d = min(decay, (1 + step) / (10 + step)): the warm-up of TensorFlow's
  ExponentialMovingAverage, so early averages do not hold on to the random init.
  Training never reads the average; it only changes which weights are evaluated.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def exported_params(state: TrainState):
  """The weights a run evaluates and writes to params.msgpack: the average when kept."""
  return state.params if state.ema_params is None else state.ema_params


def learning_rate(config: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
  """`config.learning_rate` held constant (the seed), or with `lr_schedule = "cosine"` a
  linear warm-up over `warmup_steps` to it, then a cosine decay to 0 at the last step."""
  if config.lr_schedule == "constant":
    return config.learning_rate
  total = config.epochs * config.steps_per_epoch
  return optax.warmup_cosine_decay_schedule(
    0.0, config.learning_rate, config.warmup_steps, max(total, config.warmup_steps + 1), 0.0
  )


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with Keras' defaults (epsilon 1e-7, not optax's 1e-8), as the seed used."""
  return optax.adam(learning_rate(config), b1=0.9, b2=0.999, eps=1e-7)


def create_train_state(key: jax.Array, config: ml_collections.ConfigDict) -> TrainState:
  net = tasks.build(config).model
  params = model.init_params(key, net, config.canvas_size)
  ema = jax.tree_util.tree_map(jnp.copy, params) if config.ema_decay > 0 else None
  state = TrainState.create(apply_fn=net.apply, params=params, tx=optimizer(config), ema_params=ema)
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, so checkpoints restore it


def train_step(
  state: TrainState, batch, *, loss_fn=losses.total_loss, ema_decay: float = 0.0
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on `loss_fn(outputs, batch) -> (loss, parts)`; returns the parts.

  With `ema_decay` > 0 it also updates `state.ema_params` (see `ema_update`).
  """

  def objective(params):
    return loss_fn(state.apply_fn({"params": params}, batch["image"]), batch)

  grads, step_metrics = jax.grad(objective, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if ema_decay > 0:
    state = state.replace(
      ema_params=ema_update(state.ema_params, state.params, ema_decay, state.step)
    )
  return state, step_metrics


def zero_metrics(state, digits, labels, *, sample_fn, loss_fn) -> dict[str, jax.Array]:
  """Zeros shaped like the metrics of one step (found by tracing, nothing is computed)."""
  batch = lambda: sample_fn(jax.random.key(0), state.step, digits, labels)
  shapes = jax.eval_shape(lambda: train_step(state, batch(), loss_fn=loss_fn))[1]
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def train_steps(
  state: TrainState,
  sums: dict[str, jax.Array],
  digits: jax.Array,
  labels: jax.Array,
  data_key: jax.Array,
  *,
  num_steps: int,
  sample_fn,
  loss_fn,
  mesh: jax.sharding.Mesh | None = None,
  ema_decay: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`num_steps` steps, each on a fresh batch drawn on the device; adds metrics to `sums`.

  Batch t is `sample_fn(data_key, t, digits, labels)`. With a `mesh`, every
  batch is sharded over its `data` axis (data parallelism).
  """

  def one(carry, _):
    state, sums = carry
    batch = sample_fn(data_key, state.step, digits, labels)
    batch = parallel.shard_batch(batch, mesh)
    state, m = train_step(state, batch, loss_fn=loss_fn, ema_decay=ema_decay)
    return (state, jax.tree_util.tree_map(jnp.add, sums, m)), None

  if num_steps == 1:
    return one((state, sums), None)[0]
  return jax.lax.scan(one, (state, sums), None, length=num_steps)[0]


def compile_train_steps(state: TrainState, sums, digits, labels, data_key, **static):
  """`train_steps` jitted and compiled for these arguments; `static` are its keyword
  arguments (`num_steps`, `sample_fn`, `loss_fn`, ...). Returns
  `fn(state, sums, digits, labels, data_key) -> (state, sums)`, which donates `state` and
  `sums` (`zero_metrics` gives the first sums)."""
  fn = jax.jit(functools.partial(train_steps, **static), donate_argnums=(0, 1))
  return fn.lower(state, sums, digits, labels, data_key).compile()


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
  }
)


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
  final figures (those of metrics.json).

  A workdir with checkpoints of the same config is resumed from its latest readable one
  (see `workdir.resume_step`; damaged ones are moved aside, `checkpoint.restore_readable`).
  SIGTERM or SIGINT during training saves a checkpoint and raises `errors.Stopped`
  (`jaxloc.preemption`). `echo(line)` receives the console lines (process 0 only).
  """
  tasks.check_config(config)
  data = tasks.load_data(config)  # before the workdir: bad data writes nothing
  workdir.prepare(work_dir)
  main_process = jax.process_index() == 0
  echo = echo if main_process else _silent
  with (
    preemption.Signals() as signals,
    workdir.lock(work_dir) if main_process else contextlib.nullcontext(),
  ):
    mngr = checkpoint.manager(work_dir, config.keep_checkpoints)
    with mngr:
      resume_step = workdir.resume_step(
        work_dir,
        config,
        mngr.latest_step(),
        fresh=fresh,
        resumable=resumable_changes(config),
        upgrade=tasks.upgrade_config,
      )
      mngr.reload()  # --fresh may have moved the old checkpoints aside
      state, resume_step = _initial_state(config, work_dir, mngr, resume_step, fresh, echo)
      try:
        return _run(config, work_dir, mngr, state, resume_step, data, echo, signals)
      except OSError as e:  # a full disk or lost permissions while writing logs or outputs
        raise UserError(
          f"cannot write {e.filename or work_dir} ({e.strerror or e}); the files written "
          "before are intact. Free disk space or fix the permissions, then run the same "
          "command to resume"
        ) from None


def _initial_state(config, work_dir, mngr, resume_step, fresh, echo):
  """(state, step): a new train state, or the newest readable checkpoint at or before
  `resume_step`. With `fresh`, a run none of whose checkpoints can be read is moved aside."""
  state = create_train_state(_keys(config)[0], config)
  if resume_step is None:
    return state, None
  try:
    resume_step, state = checkpoint.restore_readable(mngr, state, resume_step, echo)
  except checkpoint.Unreadable:
    if not fresh:
      raise
    logging.warning("moved the previous run in %s to %s", work_dir, workdir.move_aside(work_dir))
    mngr.reload()
    return state, None
  logging.info("resumed from step %d", resume_step)
  return state, resume_step


def _keys(config) -> tuple[jax.Array, jax.Array]:
  """(init_key, data_key) of the run: its parameters' and its batches' randomness."""
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  return init_key, data_key


def _silent(line: str) -> None:
  del line


def _run(config, work_dir, mngr, state, resume_step, data, echo, signals) -> dict:
  """The run from its initial `state` (new, or restored at `resume_step`): train and
  evaluate, export."""
  t_start = time.perf_counter()
  # Multi-host: only process 0 writes logs, plots and metrics; the others write
  # theirs to a throwaway directory (every process takes part in checkpoints).
  main_process = jax.process_index() == 0
  out_dir = work_dir if main_process else tempfile.mkdtemp(prefix="jaxloc-")
  workdir.write_json(os.path.join(out_dir, workdir.CONFIG), config.to_dict())
  task = tasks.build(config)
  mesh = parallel.data_mesh()
  data_key = _keys(config)[1]
  state, data_key, (digits, labels, val) = parallel.replicate((state, data_key, data), mesh)
  static = dict(sample_fn=task.sample_fn, loss_fn=task.loss_fn, mesh=mesh)
  steps = _Steps(state, (digits, labels, data_key), ema_decay=config.ema_decay, **static)
  steps_per_call = tasks.resolve_steps_per_call(config.steps_per_call)
  n_params = model.num_params(state.params)
  for line in console.start_lines(config, n_params, steps_per_call, resume_step):
    echo(line)
  plot = functools.partial(task.plot_predictions, out_dir, val)
  log = _Log(out_dir, resume_step, main_process, echo, plot)
  evaluate = _Evaluation(task, state.apply_fn, val, mesh)
  try:
    state, result = _train(config, state, steps, steps_per_call, log, evaluate, mngr, signals)
  finally:
    log.close()
  if result is None:  # resumed at the very end: evaluate the restored state
    result = evaluate(state)
    plot(result[1])
  final = _export(out_dir, task, state, val, result, log.history)
  final.update(
    num_params=n_params,
    steps=int(state.step),
    train_images_per_s=steps.images_per_s(config.batch_size),
    train_s=steps.train_s,
    compile_s=steps.compile_s,
    eval_s=evaluate.seconds,
    wall_s=time.perf_counter() - t_start,
    backend=jax.default_backend(),
    devices=jax.device_count(),
    resumed_from_step=resume_step,
  )
  workdir.write_json(os.path.join(out_dir, workdir.METRICS), final)
  for line in console.end_lines(work_dir, final):
    echo(line)
  return final


class _Steps:
  """Calls compiled `train_steps`, compiling each number of steps once; times both."""

  def __init__(self, state, data, **static):
    self.data, self.static = data, static  # data: (digits, labels, data_key)
    fns = dict(sample_fn=static["sample_fn"], loss_fn=static["loss_fn"])
    self.template = zero_metrics(state, *data[:2], **fns)
    self.compiled, self.compile_s, self.train_s, self.trained = {}, 0.0, 0.0, 0

  def zeros(self) -> dict[str, jax.Array]:
    return jax.tree_util.tree_map(jnp.zeros_like, self.template)

  def __call__(self, state, sums, n: int):
    """`n` training steps: (state, sums) -> (state, sums). Dispatches without waiting."""
    if n not in self.compiled:
      t = time.perf_counter()
      self.compiled[n] = compile_train_steps(state, sums, *self.data, num_steps=n, **self.static)
      self.compile_s += time.perf_counter() - t
    t = time.perf_counter()
    state, sums = self.compiled[n](state, sums, *self.data)
    self.train_s += time.perf_counter() - t
    self.trained += n
    return state, sums

  def fetch(self, sums) -> dict[str, np.ndarray]:
    """The metric sums on the host: the only host sync of the hot loop (timed as training)."""
    t = time.perf_counter()
    fetched = parallel.to_host(sums)
    self.train_s += time.perf_counter() - t
    return fetched

  def images_per_s(self, batch_size: int) -> float:
    return self.trained * batch_size / self.train_s if self.train_s > 0 else 0.0


class _Log:
  """Where the loop's records go: metrics.jsonl, TensorBoard, the console, `history`."""

  def __init__(self, out_dir: str, resume_step: int | None, main_process: bool, echo, plot):
    self.out_dir, self.echo, self.plot = out_dir, echo, plot
    self.path = os.path.join(out_dir, workdir.METRICS_LOG)
    self.records = workdir.truncate_jsonl(self.path, resume_step or 0)
    self.history = [r for r in self.records if "val/num_val" in r]  # evaluation records
    self.events = events.EventWriter(out_dir if main_process else None, resume_step)

  def write(self, record: dict) -> None:
    workdir.append_jsonl(self.path, record)
    self.events.scalars(record)
    if "val/num_val" in record:
      self.history.append(record)

  def predictions(self, step: int, per: dict) -> None:
    """predictions.png of this evaluation (`per`), also into TensorBoard."""
    self.plot(per)
    self.events.image("predictions", os.path.join(self.out_dir, "predictions.png"), step)

  def close(self) -> None:
    self.events.close()


class _EpochMeans:
  """Sums of the train metrics of the epoch in progress, rebuilt from its log on resume."""

  def __init__(self, records: list[dict], epoch_start: int):
    self.sums, self.count = {}, 0
    for r in records:
      if "steps_averaged" in r and r["step"] > epoch_start:
        n = r["steps_averaged"]
        self.add({k[6:]: v * n for k, v in r.items() if k.startswith("train/")}, n)

  def add(self, sums: dict, count: int) -> None:
    """Adds the metric sums of `count` steps."""
    for k, v in sums.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += count

  def means(self) -> dict[str, float]:
    return _means(self.sums, self.count)


def _means(sums: dict, count: int) -> dict[str, float]:
  return {f"train/{k}": float(v) / count for k, v in sums.items()}


class _Evaluation:
  """`self(state)`: the figures of the exported weights (summary, per canvas) and, with a
  moving average, the summary of the raw weights; `seconds`: time spent in it so far."""

  def __init__(self, task, apply_fn, val, mesh):
    self.evaluator, self.val, self.seconds = task.make_evaluator(apply_fn, mesh), val, 0.0

  def __call__(self, state):
    t = time.perf_counter()
    summary, per = self.evaluator(exported_params(state), self.val)
    raw = None if state.ema_params is None else self.evaluator(state.params, self.val)[0]
    self.seconds += time.perf_counter() - t
    return summary, per, raw


def _train(config, state, steps, steps_per_call, log, evaluate, mngr, signals):
  """Trains from `state.step` to the last epoch, evaluating at the end of each; returns
  the final state and the last evaluation (None when there was nothing left to train)."""
  spe, total = config.steps_per_epoch, config.epochs * config.steps_per_epoch
  step = int(state.step)
  epoch_means = _EpochMeans(log.records, step // spe * spe)
  result = None
  bar = console.progress_bar(total, step)
  for epoch in range(step // spe + 1, config.epochs + 1):
    t0, trained0 = steps.train_s, steps.trained
    state = _train_epoch(
      config, state, epoch, steps, steps_per_call, log, epoch_means, mngr, bar, signals
    )
    result = evaluate(state)
    summary, per, raw = result
    record = {"step": epoch * spe, "epoch": epoch, **epoch_means.means()}
    record.update({f"val/{k}": v for k, v in summary.items()})
    record.update({f"val_raw/{k}": v for k, v in (raw or {}).items()})
    log.write(record)
    epoch_means = _EpochMeans([], 0)
    seconds = steps.train_s - t0
    images_per_s = (steps.trained - trained0) * config.batch_size / max(seconds, 1e-9)
    log.echo(console.epoch_line(record, config.epochs, images_per_s, seconds))
    log.predictions(record["step"], per)
  bar.close()
  return state, result


def _train_epoch(config, state, epoch, steps, steps_per_call, log, epoch_means, mngr, bar, signals):
  """The steps of `epoch` from `state.step`: a metrics.jsonl record every `log_every`
  steps, a checkpoint every `checkpoint_every` steps and at the end of training. A stop
  request (`signals`) logs the steps since the last record, saves and raises `Stopped`."""
  step, epoch_end = int(state.step), epoch * config.steps_per_epoch
  total = config.epochs * config.steps_per_epoch
  sums = steps.zeros()
  while step < epoch_end:
    next_log = min((step // config.log_every + 1) * config.log_every, epoch_end)
    since_log = 0
    while step < next_log and not signals.poll():
      n = min(steps_per_call, next_log - step)
      state, sums = steps(state, sums, n)
      step, since_log = step + n, since_log + n
      bar.update(n)
    if since_log:
      _log_steps(log, epoch, step, since_log, steps.fetch(sums), epoch_means, mngr, bar)
    sums = steps.zeros()
    if signals.agree():
      if mngr.latest_step() != step and step > 0:
        checkpoint.save(mngr, state)
      bar.close()
      raise signals.stopped(step, total)
    if step // config.checkpoint_every > (step - since_log) // config.checkpoint_every or (
      step == total
    ):
      checkpoint.save(mngr, state)
  return state


def _log_steps(log, epoch, step, since_log, fetched, epoch_means, mngr, bar) -> None:
  """The record of the `since_log` steps up to `step` (their metric sums `fetched`)."""
  if not np.isfinite(fetched["loss"]):
    raise TrainingDiverged(
      f"training loss is {fetched['loss']} in steps {step - since_log + 1}..{step}; "
      f"the last good checkpoint (step {mngr.latest_step()}) is kept. "
      "Lower --config.learning_rate and start a new workdir."
    )
  means = _means(fetched, since_log)
  log.write({"step": step, "epoch": epoch, "steps_averaged": since_log, **means})
  bar.set_postfix(loss=f"{means['train/loss']:.4f}")
  epoch_means.add(fetched, since_log)


def _export(out_dir, task, state, val, result, history) -> dict:
  """params.msgpack (the exported weights), the task's end-of-run plots and files (the
  loop drew predictions.png); the final figures."""
  summary, per, raw = result
  params_bytes = serialization.to_bytes(exported_params(state))
  workdir.write_bytes_atomic(os.path.join(out_dir, workdir.PARAMS), params_bytes)
  task.write_outputs(out_dir, val, per, history)
  final = dict(summary)
  if raw is not None:
    final["raw"] = raw  # the un-averaged weights, for comparison with the seed
  return final
