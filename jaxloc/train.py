"""TrainState, the jitted train step, and `train_and_evaluate`, the whole run (scoring is
`jaxloc.evaluation`; what the config's task is, `jaxloc.tasks.build`).

The hot loop does no host work per step: each call of the compiled step function
draws its batches on the device (`sample_fn(data_key, step, ...)`, e.g.
`canvas.training_batch`, so batch t depends only on (seed, t)), applies
`steps_per_call` Adam steps, and adds the step metrics to device-side sums that
the host fetches only when it logs.
"""

import contextlib
import functools
import os
import sys
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
from tqdm import tqdm

from jaxloc import checkpoint, losses, model, parallel, tasks, workdir
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


class TrainingDiverged(UserError):
  """The training loss became NaN or infinite."""


def prepare_workdir(path: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {path!r} is a file; pass a directory path as --workdir")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    msg = f"cannot create workdir {path!r}: {e.strerror}; choose another --workdir"
    raise UserError(msg) from None
  if not os.access(path, os.W_OK):
    raise UserError(f"workdir {path!r} is not writable; choose another --workdir")


def _check_resume(path: str, config: ml_collections.ConfigDict, latest, *, fresh: bool):
  """Decides between a new run, a resume and a refusal; returns the step to resume from."""
  config_path = os.path.join(path, workdir.CONFIG)
  finished = os.path.exists(os.path.join(path, workdir.METRICS))
  if latest is None and not finished:
    return None  # nothing to resume: a new run (a partial log of a run killed early is replaced)
  old = workdir.read_json(config_path) if os.path.exists(config_path) else None
  old = tasks.upgrade_config(old) if old is not None else None
  # A decaying schedule is laid out over all epochs: changing them would change the past.
  resumable = RESUMABLE_CHANGES - ({"epochs"} if config.lr_schedule != "constant" else set())
  diff = workdir.config_diff(old or {}, config.to_dict(), resumable)
  total = config.epochs * config.steps_per_epoch
  problem = None
  if old is None:
    problem = f"workdir {path!r} holds results of a run without {workdir.CONFIG}"
  elif diff:
    problem = (
      f"workdir {path!r} holds a run with another config; differing fields:\n  " + "\n  ".join(diff)
    )
  elif latest is None or latest >= total:
    problem = f"workdir {path!r} holds a finished run of {latest or total} steps; " + (
      "raise --config.epochs to train on"
      if config.lr_schedule == "constant"
      else f"its {config.lr_schedule} learning-rate schedule has ended"
    )
  if problem is None:
    return latest
  if not fresh:
    raise UserError(
      problem + "\nUse another --workdir, or pass --fresh to move the old run "
      "aside (nothing is deleted) and start over here."
    )
  backup = workdir.move_aside(path)
  logging.warning("moved the previous run in %s to %s", path, backup)
  return None


def _means(sums: dict, count: int) -> dict[str, float]:
  return {f"train/{k}": float(v) / count for k, v in sums.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, work_dir: str, *, fresh=False) -> dict:
  """Trains the localiser with `config`, evaluates every epoch, writes the workdir.

  A workdir with checkpoints of the same config is resumed from its latest one.
  """
  tasks.check_config(config)
  prepare_workdir(work_dir)
  main_process = jax.process_index() == 0
  with workdir.lock(work_dir) if main_process else contextlib.nullcontext():
    mngr = checkpoint.manager(work_dir, config.keep_checkpoints)
    with mngr:
      resume_step = _check_resume(work_dir, config, mngr.latest_step(), fresh=fresh)
      mngr.reload()  # --fresh may have moved the old checkpoints aside
      return _run(config, work_dir, mngr, resume_step)


def _run(config, work_dir, mngr, resume_step) -> dict:
  # Multi-host: only process 0 writes logs, plots and metrics; the others write
  # theirs to a throwaway directory (every process takes part in checkpoints).
  out_dir = work_dir if jax.process_index() == 0 else tempfile.mkdtemp(prefix="jaxloc-")
  path = lambda name: os.path.join(out_dir, name)
  t_start = time.perf_counter()
  workdir.write_json(path(workdir.CONFIG), config.to_dict())
  records = workdir.truncate_jsonl(path(workdir.METRICS_LOG), resume_step or 0)

  mesh = parallel.data_mesh()
  train_digits, train_labels, val = parallel.replicate(tasks.load_data(config), mesh)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(init_key, config)
  if resume_step is not None:
    state = checkpoint.restore(mngr, state, resume_step)
    logging.info("resumed %s from step %d", work_dir, resume_step)
  state, data_key = parallel.replicate((state, data_key), mesh)
  n_params = model.num_params(state.params)
  steps_per_call = tasks.resolve_steps_per_call(config.steps_per_call)

  task = tasks.build(config)
  evaluator = task.make_evaluator(state.apply_fn, mesh)

  def evaluate(state):
    """Figures of the exported weights (summary, per canvas) and, with an EMA, of the raw ones."""
    summary, per = evaluator(exported_params(state), val)
    raw = None if state.ema_params is None else evaluator(state.params, val)[0]
    return summary, per, raw

  sample_fn, loss_fn = task.sample_fn, task.loss_fn
  ema_decay = config.ema_decay
  static = dict(sample_fn=sample_fn, loss_fn=loss_fn, mesh=mesh, ema_decay=ema_decay)
  template = zero_metrics(state, train_digits, train_labels, sample_fn=sample_fn, loss_fn=loss_fn)
  zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, template)
  compiled, compile_s = {}, 0.0

  def step_fn(n):
    nonlocal compile_s
    if n not in compiled:
      t = time.perf_counter()
      fn = jax.jit(functools.partial(train_steps, num_steps=n, **static), donate_argnums=(0, 1))
      compiled[n] = fn.lower(state, sums, train_digits, train_labels, data_key).compile()
      compile_s += time.perf_counter() - t
    return compiled[n]

  spe, total_steps = config.steps_per_epoch, config.epochs * config.steps_per_epoch
  step = int(state.step)
  history = [r for r in records if "val/num_val" in r]
  # Train means of the epoch in progress, rebuilt from its logged records on resume.
  epoch_start = step // spe * spe
  epoch_sums, epoch_count = {}, 0
  for r in records:
    if "steps_averaged" in r and r["step"] > epoch_start:
      for k, v in r.items():
        if k.startswith("train/"):
          epoch_sums[k[6:]] = epoch_sums.get(k[6:], 0.0) + v * r["steps_averaged"]
      epoch_count += r["steps_averaged"]
  sums, since_log, train_s, trained = zeros(), 0, 0.0, 0
  summary = per = raw = None
  bar = tqdm(total=total_steps, initial=step, desc="train", disable=not sys.stderr.isatty())
  for epoch in range(step // spe + 1, config.epochs + 1):
    epoch_end = epoch * spe
    while step < epoch_end:
      next_log = min((step // config.log_every + 1) * config.log_every, epoch_end)
      n = min(steps_per_call, next_log - step)
      fn = step_fn(n)
      t = time.perf_counter()
      state, sums = fn(state, sums, train_digits, train_labels, data_key)
      step, since_log, trained = step + n, since_log + n, trained + n
      if step != next_log:
        train_s += time.perf_counter() - t
        bar.update(n)
        continue
      fetched = jax.device_get(sums)  # the only host sync of the hot loop
      train_s += time.perf_counter() - t
      bar.update(n)
      if not np.isfinite(fetched["loss"]):
        raise TrainingDiverged(
          f"training loss is {fetched['loss']} in steps {step - since_log + 1}..{step}; "
          f"the last good checkpoint (step {mngr.latest_step()}) is kept. "
          "Lower --config.learning_rate and start a new workdir."
        )
      record = {
        "step": step,
        "epoch": epoch,
        "steps_averaged": since_log,
        **_means(fetched, since_log),
      }
      workdir.append_jsonl(path(workdir.METRICS_LOG), record)
      bar.set_postfix(loss=f"{record['train/loss']:.4f}")
      for k, v in fetched.items():
        epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v)
      epoch_count += since_log
      sums, since_log = zeros(), 0
      if step == epoch_end:
        summary, per, raw = evaluate(state)
        record = {"step": step, "epoch": epoch, **_means(epoch_sums, epoch_count)}
        record.update({f"val/{k}": v for k, v in summary.items()})
        record.update({f"val_raw/{k}": v for k, v in (raw or {}).items()})
        workdir.append_jsonl(path(workdir.METRICS_LOG), record)
        history.append(record)
        epoch_sums, epoch_count = {}, 0
      if step // config.checkpoint_every > (step - n) // config.checkpoint_every or (
        step == total_steps
      ):
        checkpoint.save(mngr, state)
  bar.close()

  if per is None:  # resumed at the very end: evaluate the restored state
    summary, per, raw = evaluate(state)
  params_bytes = serialization.to_bytes(exported_params(state))
  workdir.write_bytes_atomic(path(workdir.PARAMS), params_bytes)
  task.write_outputs(out_dir, val, per, history)
  final = dict(summary)
  if raw is not None:
    final["raw"] = raw  # the un-averaged weights, for comparison with the seed
  final.update(
    num_params=n_params,
    steps=step,
    train_images_per_s=(trained * config.batch_size) / train_s if train_s > 0 else 0.0,
    train_s=train_s,
    compile_s=compile_s,
    wall_s=time.perf_counter() - t_start,
    backend=jax.default_backend(),
    devices=jax.device_count(),
    resumed_from_step=resume_step,
  )
  workdir.write_json(path(workdir.METRICS), final)
  return final
