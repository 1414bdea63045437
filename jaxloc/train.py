"""TrainState, the jitted train and eval steps, and `train_and_evaluate`, the whole run.

The hot loop does no host work per step: each call of the compiled step function
draws its batches on the device (`canvas.sample_batch` with key
`fold_in(data_key, step)`, so batch t depends only on (seed, t)), applies
`steps_per_call` Adam steps, and adds the step metrics to device-side sums that
the host fetches only when it logs.
"""

import contextlib
import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization
from flax.training import train_state
from tqdm import tqdm

from jaxloc import canvas, checkpoint, losses, metrics, mnist, model, parallel, plots, workdir
from jaxloc.errors import UserError

TrainState = train_state.TrainState


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam with Keras' defaults (epsilon 1e-7, not optax's 1e-8), as the seed used."""
  return optax.adam(config.learning_rate, b1=0.9, b2=0.999, eps=1e-7)


def create_train_state(key: jax.Array, config: ml_collections.ConfigDict) -> TrainState:
  net = model.create_model(config)
  params = model.init_params(key, net, config.canvas_size)
  state = TrainState.create(apply_fn=net.apply, params=params, tx=optimizer(config))
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, so checkpoints restore it


def train_step(
  state: TrainState, batch, *, loss_fn=losses.total_loss
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on `loss_fn(outputs, batch) -> (loss, parts)`; returns the parts."""

  def objective(params):
    return loss_fn(state.apply_fn({"params": params}, batch["image"]), batch)

  grads, step_metrics = jax.grad(objective, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), step_metrics


def task_functions(config: ml_collections.ConfigDict):
  """(sample_fn(key, digits, labels) -> batch, loss_fn(outputs, batch)) for the config's task:
  one digit per canvas (the seed), or scenes of up to K digits when `config.scene` is set."""
  if config.get("scene"):
    sc = config.scene
    sample_fn = functools.partial(canvas.sample_scene, **scene_args(config))
    loss_fn = functools.partial(
      losses.scene_loss,
      classify=sc.classify,
      count_weight=sc.count_loss_weight,
      objectness_weight=sc.objectness_loss_weight,
      class_weight=config.class_loss_weight,
      box_weight=config.box_loss_weight,
    )
  else:
    sample_fn = functools.partial(
      canvas.sample_batch, batch_size=config.batch_size, canvas_size=config.canvas_size
    )
    loss_fn = functools.partial(
      losses.total_loss, class_weight=config.class_loss_weight, box_weight=config.box_loss_weight
    )
  return sample_fn, loss_fn


def scene_args(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict:
  sc = config.scene
  return dict(
    batch_size=batch_size or config.batch_size,
    canvas_size=config.canvas_size,
    max_objects=sc.max_objects,
    count_probs=tuple(sc.count_probs),
    target_class=sc.target_class,
    distractor_prob=sc.distractor_prob,
    size_range=tuple(sc.size_range),
    tight_boxes=sc.box_type == "tight",
    max_overlap=sc.max_overlap,
  )


def zero_metrics(state, digits, labels, *, sample_fn, loss_fn) -> dict[str, jax.Array]:
  """Zeros shaped like the metrics of one step (found by tracing, nothing is computed)."""
  step = lambda: train_step(state, sample_fn(jax.random.key(0), digits, labels), loss_fn=loss_fn)
  shapes = jax.eval_shape(step)[1]
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
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`num_steps` steps, each on a fresh batch drawn on the device; adds metrics to `sums`.

  Batch t is `sample_fn(fold_in(data_key, t), digits, labels)`. With a `mesh`, every
  batch is sharded over its `data` axis (data parallelism).
  """

  def one(carry, _):
    state, sums = carry
    batch = sample_fn(jax.random.fold_in(data_key, state.step), digits, labels)
    batch = parallel.shard_batch(batch, mesh)
    state, m = train_step(state, batch, loss_fn=loss_fn)
    return (state, jax.tree_util.tree_map(jnp.add, sums, m)), None

  if num_steps == 1:
    return one((state, sums), None)[0]
  return jax.lax.scan(one, (state, sums), None, length=num_steps)[0]


@functools.partial(jax.jit, static_argnames=("apply_fn", "canvas_size", "mesh"))
def eval_step(apply_fn, params, digits, labels, xy, mask, *, canvas_size: int, mesh=None):
  """Renders one validation batch and returns (sums, per-canvas results)."""
  batch = parallel.shard_batch(canvas.render(digits, labels, xy, canvas_size=canvas_size), mesh)
  outputs = apply_fn({"params": params}, batch["image"])
  return metrics.batch_sums(outputs, batch, mask), metrics.per_example(outputs, batch)


def evaluate(apply_fn, params, val: dict, *, canvas_size: int, batch_size: int, mesh=None):
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
      mesh=mesh,
    )
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    per.append(jax.tree_util.tree_map(lambda a, m=mask: np.asarray(a)[m], ex))
  per = {k: np.concatenate([p[k] for p in per]) for k in per[0]}
  return metrics.summarize(jax.device_get(totals), per["iou"]), per


SCENE_VAL_CHUNK = 500  # scene validation canvases per key: chunk i uses fold_in(val_key, i)


def evaluate_scenes(apply_fn, params, val: dict, config, *, mesh=None):
  """Scores the fixed validation scenes; returns (summary, per-canvas numpy arrays)."""
  sc, n = config.scene, config.num_val if config.num_val > 0 else 10_000
  chunk = min(SCENE_VAL_CHUNK, n)
  loss_args = (
    ("classify", sc.classify),
    ("count_weight", sc.count_loss_weight),
    ("objectness_weight", sc.objectness_loss_weight),
    ("class_weight", config.class_loss_weight),
    ("box_weight", config.box_loss_weight),
  )
  step = _scene_eval_step(
    apply_fn,
    tuple(scene_args(config, chunk).items()),
    loss_args,
    mesh if chunk % jax.device_count() == 0 else None,
  )
  val_key = jax.random.key(config.val_seed)
  per, parts = [], []
  for i in range(-(-n // chunk)):
    ex, loss_parts = step(params, jax.random.fold_in(val_key, i), val["digits"], val["labels"])
    per.append(jax.device_get(ex))
    parts.append(jax.device_get(loss_parts))
  per = {k: np.concatenate([p[k] for p in per])[:n] for k in per[0]}
  summary = metrics.scene_summary(per, sc.classify, np.mean(sc.size_range) / config.canvas_size)
  summary.update({k: float(np.mean([p[k] for p in parts])) for k in parts[0] if "_loss" in k})
  return summary, per


@functools.lru_cache(maxsize=8)
def _scene_eval_step(apply_fn, sample_args: tuple, loss_args: tuple, mesh):
  """The jitted scoring of one chunk of validation scenes (compiled once per config)."""
  classify = dict(loss_args)["classify"]

  @jax.jit
  def step(params, key, digits, labels):
    scene = canvas.sample_scene(key, digits, labels, **dict(sample_args))
    scene = parallel.shard_batch(scene, mesh)
    out = apply_fn({"params": params}, scene["image"])
    _, parts = losses.scene_loss(out, scene, **dict(loss_args))
    assign = losses.match(losses.match_cost(out, scene, classify=classify), scene["valid"])
    probs = jax.nn.softmax(out["logits"], -1)
    ex = {
      "count": scene["count"],
      "valid": scene["valid"],
      "box": scene["box"],
      "label": scene["label"],
      "assign": assign,
      "pred_box": out["box"],
      "pred_count": jnp.argmax(out["count_logits"], -1),
      "pred_label": jnp.argmax(probs, -1),
      "class_score": jnp.max(probs, -1),
      "objectness": jax.nn.sigmoid(out["objectness"]),
    }
    return ex, parts

  return step


def make_evaluator(config, apply_fn, mesh=None):
  """`evaluator(params, val) -> (summary, per-canvas arrays)` for the config's task."""
  if config.get("scene"):
    return lambda params, val: evaluate_scenes(apply_fn, params, val, config, mesh=mesh)
  return lambda params, val: evaluate(
    apply_fn,
    params,
    val,
    canvas_size=config.canvas_size,
    batch_size=config.eval_batch_size,
    mesh=mesh,
  )


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


# Steps per compiled call when config.steps_per_call = -1. CPU: one step per call;
# a lax.scan of steps ran slower there (see README, benchmark). Accelerators: a
# scan of 50 steps removes per-step dispatch (not measured in this repository).
DEFAULT_STEPS_PER_CALL = {"cpu": 1}
DEFAULT_STEPS_PER_CALL_ACCELERATOR = 50


def resolve_steps_per_call(steps_per_call: int) -> int:
  if steps_per_call > 0:
    return steps_per_call
  return DEFAULT_STEPS_PER_CALL.get(jax.default_backend(), DEFAULT_STEPS_PER_CALL_ACCELERATOR)


class TrainingDiverged(UserError):
  """The training loss became NaN or infinite."""


def check_config(config: ml_collections.ConfigDict) -> None:
  """Rejects settings that cannot work, with the fix in the message."""
  positive = (
    "batch_size",
    "epochs",
    "steps_per_epoch",
    "eval_batch_size",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
  )
  for name in positive:
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise UserError(f"config.{name}={value!r} must be a positive integer")
  if config.steps_per_call != -1 and not config.steps_per_call >= 1:
    raise UserError(
      f"config.steps_per_call={config.steps_per_call!r} must be -1 (per backend) or positive"
    )
  if not config.learning_rate > 0:
    raise UserError(f"config.learning_rate={config.learning_rate!r} must be positive")
  canvas.check_canvas_size(config.canvas_size)
  if config.get("scene"):
    check_scene_config(config)
  parallel.check_divisible(config.batch_size)
  parallel.check_divisible(config.eval_batch_size, "eval_batch_size")


def check_scene_config(config: ml_collections.ConfigDict) -> None:
  sc = config.scene
  k = sc.max_objects
  if not isinstance(k, int) or k < 1:
    raise UserError(f"config.scene.max_objects={k!r} must be a positive integer")
  probs = tuple(sc.count_probs)
  if len(probs) != k + 1 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
    raise UserError(
      f"config.scene.count_probs={probs} must be {k + 1} probabilities (counts 0..{k}) "
      "that sum to 1"
    )
  lo, hi = tuple(sc.size_range)
  if not 1 <= lo <= hi:
    raise UserError(f"config.scene.size_range=({lo}, {hi}) must satisfy 1 <= min <= max")
  if sc.box_type not in ("patch", "tight"):
    raise UserError(f"config.scene.box_type={sc.box_type!r}: use 'patch' or 'tight'")
  if not -1 <= sc.target_class <= 9:
    raise UserError(f"config.scene.target_class={sc.target_class}: use -1 (any) or 0..9")
  if sc.target_class < 0 and sc.distractor_prob > 0:
    raise UserError("config.scene.distractor_prob needs a config.scene.target_class >= 0")
  canvas.check_scene(config.canvas_size, k + (sc.distractor_prob > 0), hi, sc.max_overlap)


def load_data(config: ml_collections.ConfigDict):
  """Training digits and the fixed validation set, on the device."""
  train_digits, train_labels = mnist.load("train", mnist_dir=config.mnist_dir or None)
  test_digits, test_labels = mnist.load("test", mnist_dir=config.mnist_dir or None)
  if config.get("scene"):  # validation scenes are drawn from the test digits with a fixed key
    val = {"digits": jnp.asarray(test_digits), "labels": jnp.asarray(test_labels)}
    return jnp.asarray(train_digits), jnp.asarray(train_labels), val
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


def _check_resume(path: str, config: ml_collections.ConfigDict, latest, *, fresh: bool):
  """Decides between a new run, a resume and a refusal; returns the step to resume from."""
  config_path = os.path.join(path, workdir.CONFIG)
  finished = os.path.exists(os.path.join(path, workdir.METRICS))
  if latest is None and not finished:
    return None  # nothing to resume: a new run (a partial log of a run killed early is replaced)
  old = workdir.read_json(config_path) if os.path.exists(config_path) else None
  diff = workdir.config_diff(old or {}, config.to_dict(), RESUMABLE_CHANGES)
  total = config.epochs * config.steps_per_epoch
  problem = None
  if old is None:
    problem = f"workdir {path!r} holds results of a run without {workdir.CONFIG}"
  elif diff:
    problem = (
      f"workdir {path!r} holds a run with another config; differing fields:\n  " + "\n  ".join(diff)
    )
  elif latest is None or latest >= total:
    problem = (
      f"workdir {path!r} holds a finished run of {latest or total} steps; "
      "raise --config.epochs to train on"
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


def write_plots(out_dir: str, config, val: dict, per: dict, history: list[dict]) -> None:
  """curves.png from the evaluation records, predictions.png of the first validation canvases;
  for scenes also pr.png and the COCO JSON files of the validation detections."""
  plots.plot_curves(history, os.path.join(out_dir, "curves.png"))
  if config.get("scene"):
    _write_scene_outputs(out_dir, config, val, per)
    return
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
    os.path.join(out_dir, "predictions.png"),
    true_label_N=np.asarray(val["labels"][:k]),
  )


def _write_scene_outputs(out_dir: str, config, val: dict, per: dict) -> None:
  classify = config.scene.classify
  dets, gts = metrics.scene_detections(per, classify)
  gt_json, det_json = metrics.coco_json(
    dets, gts, config.canvas_size, len(per["count"]), range(10) if classify else [0]
  )
  workdir.write_json(os.path.join(out_dir, "ground_truth.json"), gt_json)
  workdir.write_json(os.path.join(out_dir, "detections.json"), det_json)
  curve = metrics.average_precision(dets, gts, with_curve=True)
  plots.plot_pr(
    metrics.RECALL_POINTS, np.asarray(curve["pr50"]), curve["AP50"], os.path.join(out_dir, "pr.png")
  )
  k = min(config.num_plot, len(per["count"]))
  chunk = min(SCENE_VAL_CHUNK, config.num_val if config.num_val > 0 else 10_000)
  first = canvas.sample_scene(
    jax.random.fold_in(jax.random.key(config.val_seed), 0),
    val["digits"],
    val["labels"],
    **scene_args(config, chunk),
  )
  plots.plot_scenes(
    np.asarray(first["image"][:k, :, :, 0]),
    {name: a[:k] for name, a in per.items()},
    classify,
    os.path.join(out_dir, "predictions.png"),
  )


def _means(sums: dict, count: int) -> dict[str, float]:
  return {f"train/{k}": float(v) / count for k, v in sums.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, work_dir: str, *, fresh=False) -> dict:
  """Trains the localiser with `config`, evaluates every epoch, writes the workdir.

  A workdir with checkpoints of the same config is resumed from its latest one.
  """
  check_config(config)
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
  train_digits, train_labels, val = parallel.replicate(load_data(config), mesh)
  init_key, data_key = jax.random.split(jax.random.key(config.seed))
  state = create_train_state(init_key, config)
  if resume_step is not None:
    state = checkpoint.restore(mngr, state, resume_step)
    logging.info("resumed %s from step %d", work_dir, resume_step)
  state, data_key = parallel.replicate((state, data_key), mesh)
  n_params = model.num_params(state.params)
  steps_per_call = resolve_steps_per_call(config.steps_per_call)

  evaluator = make_evaluator(config, state.apply_fn, mesh)
  sample_fn, loss_fn = task_functions(config)
  static = dict(sample_fn=sample_fn, loss_fn=loss_fn, mesh=mesh)
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
  summary = per = None
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
        summary, per = evaluator(state.params, val)
        record = {"step": step, "epoch": epoch, **_means(epoch_sums, epoch_count)}
        record.update({f"val/{k}": v for k, v in summary.items()})
        workdir.append_jsonl(path(workdir.METRICS_LOG), record)
        history.append(record)
        epoch_sums, epoch_count = {}, 0
      if step // config.checkpoint_every > (step - n) // config.checkpoint_every or (
        step == total_steps
      ):
        checkpoint.save(mngr, state)
  bar.close()

  if per is None:  # resumed at the very end: evaluate the restored state
    summary, per = evaluator(state.params, val)
  workdir.write_bytes_atomic(path(workdir.PARAMS), serialization.to_bytes(state.params))
  write_plots(out_dir, config, val, per, history)
  final = dict(summary)
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
