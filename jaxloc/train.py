"""TrainState, the jitted train and eval steps, and `train_and_evaluate`, the whole run.

The hot loop does no host work per step: each call of the compiled step function
draws its batches on the device (`canvas.sample_batch` with key
`fold_in(data_key, step)`, so batch t depends only on (seed, t)), applies
`steps_per_call` Adam steps, and adds the step metrics to device-side sums that
the host fetches only when it logs.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import serialization
from flax.training import train_state
from tqdm import tqdm

from jaxloc import canvas, losses, metrics, mnist, model, plots, workdir
from jaxloc.errors import UserError

TrainState = train_state.TrainState


def create_model(config: ml_collections.ConfigDict) -> model.Localizer:
  return model.Localizer(
    num_classes=10,
    conv_features=tuple(config.conv_features),
    dense_features=config.dense_features,
  )


def create_train_state(key: jax.Array, config: ml_collections.ConfigDict) -> TrainState:
  net = create_model(config)
  params = model.init_params(key, net, config.canvas_size)
  return TrainState.create(apply_fn=net.apply, params=params, tx=optax.adam(config.learning_rate))


def train_step(
  state: TrainState, batch: canvas.Batch, *, class_weight: float = 1.0, box_weight: float = 1.0
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on the weighted class + box loss; returns scalar metrics."""

  def loss_fn(params):
    outputs = state.apply_fn({"params": params}, batch["image"])
    loss, parts = losses.total_loss(
      outputs, batch, class_weight=class_weight, box_weight=box_weight
    )
    parts["accuracy"] = jnp.mean(jnp.argmax(outputs["logits"], -1) == batch["label"])
    return loss, parts

  grads, step_metrics = jax.grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), step_metrics


def zero_metrics() -> dict[str, jax.Array]:
  names = ("loss", "class_loss", "box_loss", "accuracy")
  return {name: jnp.zeros((), jnp.float32) for name in names}


def train_steps(
  state: TrainState,
  sums: dict[str, jax.Array],
  digits: jax.Array,
  labels: jax.Array,
  data_key: jax.Array,
  *,
  num_steps: int,
  batch_size: int,
  canvas_size: int,
  class_weight: float,
  box_weight: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`num_steps` steps, each on a fresh batch drawn on the device; adds metrics to `sums`."""

  def one(carry, _):
    state, sums = carry
    key = jax.random.fold_in(data_key, state.step)
    batch = canvas.sample_batch(key, digits, labels, batch_size=batch_size, canvas_size=canvas_size)
    state, m = train_step(state, batch, class_weight=class_weight, box_weight=box_weight)
    return (state, jax.tree_util.tree_map(jnp.add, sums, m)), None

  if num_steps == 1:
    return one((state, sums), None)[0]
  return jax.lax.scan(one, (state, sums), None, length=num_steps)[0]


@functools.partial(jax.jit, static_argnames=("apply_fn", "canvas_size"))
def eval_step(apply_fn, params, digits, labels, xy, mask, *, canvas_size: int):
  """Renders one validation batch and returns (sums, per-canvas results)."""
  batch = canvas.render(digits, labels, xy, canvas_size=canvas_size)
  outputs = apply_fn({"params": params}, batch["image"])
  return metrics.batch_sums(outputs, batch, mask), metrics.per_example(outputs, batch)


def evaluate(apply_fn, params, val: dict, *, canvas_size: int, batch_size: int):
  """Scores the fixed validation set in batches of `batch_size` (the last one padded).

  Returns (summary dict, per-canvas results as numpy arrays).
  """
  n = val["labels"].shape[0]
  totals, per = None, []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < n
    idx = np.minimum(idx, n - 1)
    sums, ex = eval_step(
      apply_fn,
      params,
      val["digits"][idx],
      val["labels"][idx],
      val["xy"][idx],
      jnp.asarray(mask),
      canvas_size=canvas_size,
    )
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    per.append(jax.tree_util.tree_map(lambda a, m=mask: np.asarray(a)[m], ex))
  per = {k: np.concatenate([p[k] for p in per]) for k in per[0]}
  return metrics.summarize(jax.device_get(totals), per["iou"]), per


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects settings that cannot work, with the fix in the message."""
  positive = ("batch_size", "epochs", "steps_per_epoch", "eval_batch_size", "log_every")
  for name in positive + ("steps_per_call",):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise UserError(f"config.{name}={value!r} must be a positive integer")
  if not config.learning_rate > 0:
    raise UserError(f"config.learning_rate={config.learning_rate!r} must be positive")
  canvas.check_canvas_size(config.canvas_size)


def load_data(config: ml_collections.ConfigDict):
  """Training digits and the fixed validation set, on the device."""
  train_digits, train_labels = mnist.load("train", mnist_dir=config.mnist_dir or None)
  test_digits, test_labels = mnist.load("test", mnist_dir=config.mnist_dir or None)
  if config.num_val > 0:
    test_digits, test_labels = test_digits[: config.num_val], test_labels[: config.num_val]
  val_key = jax.random.key(config.val_seed)
  val = {
    "digits": jnp.asarray(test_digits),
    "labels": jnp.asarray(test_labels),
    "xy": canvas.validation_offsets(val_key, len(test_labels), config.canvas_size),
  }
  return jnp.asarray(train_digits), jnp.asarray(train_labels), val


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
  if os.path.exists(os.path.join(path, workdir.METRICS)):
    raise UserError(
      f"workdir {path!r} already holds a finished run ({workdir.METRICS}); "
      "choose a new --workdir so nothing is overwritten"
    )


def _means(sums: dict, count: int) -> dict[str, float]:
  return {f"train/{k}": float(v) / count for k, v in sums.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, work_dir: str) -> dict:
  """Trains the localiser with `config`, evaluates every epoch, writes the workdir."""
  check_config(config)
  prepare_workdir(work_dir)
  path = lambda name: os.path.join(work_dir, name)
  workdir.write_json(path(workdir.CONFIG), config.to_dict())
  for stale in (workdir.METRICS_LOG,):
    if os.path.exists(path(stale)):
      os.remove(path(stale))
  t_start = time.perf_counter()

  train_digits, train_labels, val = load_data(config)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(init_key, config)
  n_params = model.num_params(state.params)

  static = dict(
    batch_size=config.batch_size,
    canvas_size=config.canvas_size,
    class_weight=config.class_loss_weight,
    box_weight=config.box_loss_weight,
  )
  compiled, compile_s = {}, 0.0

  def step_fn(n):
    nonlocal compile_s
    if n not in compiled:
      t = time.perf_counter()
      fn = jax.jit(functools.partial(train_steps, num_steps=n, **static), donate_argnums=(0, 1))
      compiled[n] = fn.lower(state, sums, train_digits, train_labels, data_key).compile()
      compile_s += time.perf_counter() - t
    return compiled[n]

  total_steps = config.epochs * config.steps_per_epoch
  sums, since_log = zero_metrics(), 0
  epoch_sums, epoch_count = {}, 0
  history, train_s = [], 0.0
  bar = tqdm(total=total_steps, desc="train", disable=not sys.stderr.isatty(), unit="step")
  step = 0
  for epoch in range(1, config.epochs + 1):
    epoch_end = epoch * config.steps_per_epoch
    while step < epoch_end:
      next_log = min((step // config.log_every + 1) * config.log_every, epoch_end)
      n = min(config.steps_per_call, next_log - step)
      fn = step_fn(n)
      t = time.perf_counter()
      state, sums = fn(state, sums, train_digits, train_labels, data_key)
      step += n
      since_log += n
      if step == next_log:
        fetched = jax.device_get(sums)  # the only host sync of the hot loop
        train_s += time.perf_counter() - t
        if not np.isfinite(fetched["loss"]):
          raise FloatingPointError(
            f"non-finite training loss in steps {step - since_log + 1}..{step}; "
            "lower --config.learning_rate"
          )
        record = {"step": step, "epoch": epoch, **_means(fetched, since_log)}
        workdir.append_jsonl(path(workdir.METRICS_LOG), record)
        bar.set_postfix(loss=f"{record['train/loss']:.4f}")
        for k, v in fetched.items():
          epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v)
        epoch_count += since_log
        sums, since_log = zero_metrics(), 0
      else:
        train_s += time.perf_counter() - t
      bar.update(n)

    summary, per = evaluate(
      state.apply_fn,
      state.params,
      val,
      canvas_size=config.canvas_size,
      batch_size=config.eval_batch_size,
    )
    record = {"step": step, "epoch": epoch, **_means(epoch_sums, epoch_count)}
    record.update({f"val/{k}": v for k, v in summary.items()})
    workdir.append_jsonl(path(workdir.METRICS_LOG), record)
    history.append(record)
    epoch_sums, epoch_count = {}, 0
  bar.close()

  workdir.write_bytes_atomic(path(workdir.PARAMS), serialization.to_bytes(state.params))
  plots.plot_curves(history, path("curves.png"))
  k = min(config.num_plot, len(per["iou"]))
  images = canvas.render(
    val["digits"][:k], val["labels"][:k], val["xy"][:k], canvas_size=config.canvas_size
  )
  plots.plot_predictions(
    np.asarray(images["image"][..., 0]),
    np.asarray(images["box"]),
    per["pred_box"][:k],
    per["pred_label"][:k],
    per["iou"][:k],
    path("predictions.png"),
    true_label_N=np.asarray(val["labels"][:k]),
  )
  final = dict(summary)
  final.update(
    num_params=n_params,
    steps=step,
    train_images_per_s=(step * config.batch_size) / train_s if train_s > 0 else 0.0,
    train_s=train_s,
    compile_s=compile_s,
    wall_s=time.perf_counter() - t_start,
    backend=jax.default_backend(),
    devices=jax.device_count(),
  )
  workdir.write_json(path(workdir.METRICS), final)
  return final
