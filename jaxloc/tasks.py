"""What a config asks for: `build(config)` returns everything a run needs, and `check_config`
rejects settings that cannot work.

This is the one place that reads what kind of task a config describes: the seed's task
(one digit per canvas, no `config.scene`: a `Localizer`) or a scene case (`config.scene`),
answered by the dense detector (`config.head = "dense"`, `jaxloc.dense`) or by K slots
(`config.head = "slots"`). Everything it returns takes explicit arguments; the train
loop, the evaluator, the Predictor and the scripts call it instead of branching.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxloc import (
  answers,
  canvas,
  datasets,
  dense,
  evaluation,
  losses,
  metrics,
  mnist,
  model,
  parallel,
)
from jaxloc.errors import UserError

HEADS = ("dense", "slots")
BOX_TYPES = ("patch", "tight", "ink")


class Task(NamedTuple):
  """Everything a run of one config needs."""

  model: nn.Module
  sample_fn: Callable  # (data_key, step, digits, labels) -> training batch
  # (outputs, batch, hp=None) -> (loss, {name: scalar}); its weights are the config's, or those
  # of `hp` (`hyperparameters`: a replica member's values, traced) when given
  loss_fn: Callable
  # (apply_fn, mesh, members) -> evaluator(params, val) -> (summary, per); with members, of
  # stacked params, a list of them (the models scored in one compiled call per batch)
  make_evaluator: Callable
  write_outputs: Callable  # (out_dir, val, per, history): the run's end: curves (scenes: COCO..)
  plot_predictions: Callable  # (out_dir, val, per): predictions.png (after every evaluation)
  answer: Callable  # jittable (model outputs) -> {name: array}: the Predictor's answers


# Fields added after runs were written, with the value that reproduces those runs.
ADDED_FIELDS = {
  "ema_decay": 0.0,
  "lr_schedule": "constant",
  "warmup_steps": 0,
  "replicas": 1,
  "replica_mode": "auto",
  "vary": "",
}
ADDED_SCENE_FIELDS = {"head": "slots", "data": {}}  # data: filled in below
ADDED_NESTED_FIELDS = {
  "scene": {"paste_mode": "max"},
  "data": {"train_path": "", "val_path": ""},
  "dense": {
    "backbone": "single",
    "pyramid_features": (128, 128),
    "neck_features": 128,
    "norm": "none",
  },
}


def upgrade_config(config: dict) -> dict:
  """A saved config.json as a dict of today's fields: what a workdir written before a field
  existed ran with (scene runs then had only the slot detector, and no datasets on disk)."""
  added = dict(ADDED_FIELDS, **(ADDED_SCENE_FIELDS if config.get("scene") else {}))
  config = {**added, **config}
  for group, fields in ADDED_NESTED_FIELDS.items():
    if group in config:
      config[group] = {**fields, **config[group]}
  return config


def build(config: ml_collections.ConfigDict) -> Task:
  """The model, data, loss, evaluation and answers of the config's task."""
  if not config.get("scene"):
    return _digit_task(config)
  if config.head == "slots":
    return _slot_task(config)
  return _dense_task(config)


def _digit_task(config) -> Task:
  common = dict(conv_features=tuple(config.conv_features), dense_features=config.dense_features)
  digit_args = dict(canvas_size=config.canvas_size)
  return Task(
    model=model.Localizer(num_classes=10, **common),
    sample_fn=functools.partial(canvas.training_batch, batch_size=config.batch_size, **digit_args),
    loss_fn=_weighted(losses.total_loss, config),
    make_evaluator=lambda apply_fn, mesh=None, members=False: functools.partial(
      evaluation.evaluate,
      apply_fn,
      batch_size=config.eval_batch_size,
      mesh=mesh,
      members=members,
      **digit_args,
    ),
    write_outputs=evaluation.write_digit_outputs,
    plot_predictions=functools.partial(
      evaluation.plot_digit_predictions, num_plot=config.num_plot, **digit_args
    ),
    answer=answers.digit_answers,
  )


def data_paths(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(config.data.train_path, config.data.val_path): datasets on disk ("" = synthetic)."""
  data = config.get("data") or {}
  return data.get("train_path", ""), data.get("val_path", "")


def _scene_sampler(config):
  """Training scenes: digits drawn with replacement, batch t with key fold_in(data_key, t);
  or, with config.data.train_path, the stored set read in keyed passes
  (`canvas.stored_training_batch`; load_data gives the set as `digits`, None as `labels`)."""
  if data_paths(config)[0]:
    stored = functools.partial(canvas.stored_training_batch, batch_size=config.batch_size)
    return lambda data_key, step, data, _: stored(data_key, step, data)
  scene = functools.partial(canvas.sample_scene, **scene_args(config))
  return lambda data_key, step, *data: scene(jax.random.fold_in(data_key, step), *data)


def _scene_evaluation(config, score_chunk):
  """make_evaluator, write_outputs and plot_predictions of a scene task, given how a chunk
  is scored."""
  sc = config.scene
  summarize = functools.partial(
    metrics.scene_summary,
    classify=sc.classify,
    digit_size=sum(sc.size_range) / 2 / config.canvas_size,
  )
  num_val = config.num_val if config.num_val > 0 else 10_000
  chunk = min(evaluation.SCENE_VAL_CHUNK, num_val)
  if data_paths(config)[1]:
    make_chunk = functools.partial(evaluation.stored_chunk, chunk=chunk)
  else:
    make_chunk = functools.partial(
      evaluation.sampled_chunk, sample_args=scene_args(config, chunk), val_seed=config.val_seed
    )
  categories = range(10) if sc.classify else [0]

  def make_evaluator(apply_fn, mesh=None, members=False):
    mesh = mesh if chunk % jax.device_count() == 0 else None
    step = evaluation.scene_eval_step(apply_fn, score_chunk, make_chunk, mesh, members)
    return lambda params, val: evaluation.evaluate_scenes(
      step, params, val, summarize, chunk=chunk, num_val=num_val, members=members
    )

  write_outputs = functools.partial(
    evaluation.write_scene_outputs,
    canvas_size=config.canvas_size,
    num_plot=config.num_plot,
    categories=categories,
    make_chunk=make_chunk,
  )
  plot_predictions = functools.partial(
    evaluation.plot_scene_predictions,
    num_plot=config.num_plot,
    classify=sc.classify,
    make_chunk=make_chunk,
  )
  return make_evaluator, write_outputs, plot_predictions


def _slot_task(config) -> Task:
  sc = config.scene
  loss_args = scene_loss_args(config)
  score_chunk = functools.partial(answers.slot_chunk, **loss_args)
  make_evaluator, write_outputs, plot_predictions = _scene_evaluation(config, score_chunk)
  common = dict(conv_features=tuple(config.conv_features), dense_features=config.dense_features)
  return Task(
    model=model.Detector(max_objects=sc.max_objects, num_classes=10, **common),
    sample_fn=_scene_sampler(config),
    loss_fn=_weighted(functools.partial(losses.scene_loss, **loss_args), config),
    make_evaluator=make_evaluator,
    write_outputs=write_outputs,
    plot_predictions=plot_predictions,
    answer=functools.partial(answers.slot_answers, classify=sc.classify),
  )


def _dense_task(config) -> Task:
  sc, dn = config.scene, config.dense
  num_classes = 10 if sc.classify else 1
  geometry = dict(canvas_size=config.canvas_size, stride=dn.stride)
  decode = functools.partial(dense.decode, k=dn.top_k, **geometry)
  loss_fn = _weighted(
    functools.partial(dense.scene_loss, num_classes=num_classes, **geometry), config
  )
  answer = functools.partial(answers.dense_answers, decode=decode, threshold=dn.score_threshold)
  score_chunk = functools.partial(answers.dense_chunk, answer=answer, loss_fn=loss_fn)
  make_evaluator, write_outputs, plot_predictions = _scene_evaluation(config, score_chunk)
  net = model.DenseDetector(
    num_classes=num_classes,
    conv_features=tuple(config.conv_features),
    context_features=tuple(dn.context_features),
    stride=dn.stride,
    prior=dn.prior,
    backbone=dn.backbone,
    pyramid_features=tuple(dn.pyramid_features),
    neck_features=dn.neck_features,
    norm=dn.norm,
  )
  return Task(
    model=net,
    sample_fn=_scene_sampler(config),
    loss_fn=loss_fn,
    make_evaluator=make_evaluator,
    write_outputs=write_outputs,
    plot_predictions=plot_predictions,
    answer=answer,
  )


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The weights of the task's training loss that a replica member may set to its own value
  (`config.vary`): loss argument -> config field. The slot detector's class and box weights
  are not among them: they also set its evaluation's matching, which the members share."""
  if not config.get("scene"):
    return {"class_weight": "class_loss_weight", "box_weight": "box_loss_weight"}
  if config.head == "slots":
    sc = "scene."
    return {
      "count_weight": sc + "count_loss_weight",
      "objectness_weight": sc + "objectness_loss_weight",
    }
  return {"heatmap_weight": "dense.heatmap_loss_weight", "box_weight": "dense.box_loss_weight"}


def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, float]:
  """{config field: value} of the numbers that enter the compiled train step as arguments,
  not as constants, so that replica members may differ in them (`config.vary`): the Adam
  step size (a schedule's peak), the moving average's decay and the loss weights."""
  fields = ("learning_rate", "ema_decay", *loss_weights(config).values())
  return {f: float(functools.reduce(lambda c, name: c[name], f.split("."), config)) for f in fields}


def _weighted(loss, config) -> Callable:
  """`loss(outputs, batch, **weights)` as a Task's loss_fn (`loss_weights` from the config, or
  from `hp` when given)."""
  weights, own = loss_weights(config), hyperparameters(config)

  def loss_fn(outputs, batch, hp=None):
    hp = own if hp is None else hp
    return loss(outputs, batch, **{arg: hp[field] for arg, field in weights.items()})

  return loss_fn


def scene_loss_args(config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments of `losses.scene_loss` (the slot detector's loss) for the config."""
  sc = config.scene
  return dict(
    classify=sc.classify,
    count_weight=sc.count_loss_weight,
    objectness_weight=sc.objectness_loss_weight,
    class_weight=config.class_loss_weight,
    box_weight=config.box_loss_weight,
  )


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
    box_type=sc.box_type,
    paste_mode=sc.paste_mode,
    max_overlap=sc.max_overlap,
  )


# Steps per compiled call when config.steps_per_call = -1. CPU: a lax.scan of 10
# steps ran 1.7x as fast as one step per call on the 2-core CPU machine (632 vs 372
# images/s, `python -m experiments.benchmark`). GPU: on one H100 a scan of 50 steps ran the
# seed's step at 73,261 images/s and one step per call at 70,678 (benchmark parts
# train_jaxloc / train_jaxloc_1, --steps=2000), but every other chunk length (the steps
# left before a log or an epoch end) is one more compilation: the seed protocol compiled
# 20 lengths in 64 s with 50. One step per call compiles once.
DEFAULT_STEPS_PER_CALL = {"cpu": 10}
DEFAULT_STEPS_PER_CALL_ACCELERATOR = 1


def resolve_steps_per_call(steps_per_call: int) -> int:
  if steps_per_call > 0:
    return steps_per_call
  return DEFAULT_STEPS_PER_CALL.get(jax.default_backend(), DEFAULT_STEPS_PER_CALL_ACCELERATOR)


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
    "replicas",
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
  if config.lr_schedule not in ("constant", "cosine"):
    raise UserError(f"config.lr_schedule={config.lr_schedule!r}: use 'constant' or 'cosine'")
  if not isinstance(config.warmup_steps, int) or config.warmup_steps < 0:
    raise UserError(f"config.warmup_steps={config.warmup_steps!r} must be an integer >= 0")
  if not 0.0 <= config.ema_decay < 1.0:
    raise UserError(
      f"config.ema_decay={config.ema_decay!r} must lie in [0, 1) (0 = no moving average)"
    )
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
  if sc.box_type not in BOX_TYPES:
    raise UserError(f"config.scene.box_type={sc.box_type!r}: use one of {BOX_TYPES}")
  if sc.paste_mode not in canvas.PASTE_MODES:
    raise UserError(f"config.scene.paste_mode={sc.paste_mode!r}: use one of {canvas.PASTE_MODES}")
  if not -1 <= sc.target_class <= 9:
    raise UserError(f"config.scene.target_class={sc.target_class}: use -1 (any) or 0..9")
  if sc.target_class < 0 and sc.distractor_prob > 0:
    raise UserError("config.scene.distractor_prob needs a config.scene.target_class >= 0")
  canvas.check_scene(config.canvas_size, k + (sc.distractor_prob > 0), hi, sc.max_overlap)
  if config.head not in HEADS:
    raise UserError(f"config.head={config.head!r}: use one of {', '.join(map(repr, HEADS))}")
  if config.head == "dense":
    check_dense_config(config)


def check_dense_config(config: ml_collections.ConfigDict) -> None:
  dn, k = config.dense, config.scene.max_objects
  if dn.backbone not in model.BACKBONES:
    raise UserError(f"config.dense.backbone={dn.backbone!r}: use one of {model.BACKBONES}")
  if dn.norm not in model.NORMS:
    raise UserError(f"config.dense.norm={dn.norm!r}: use one of {model.NORMS}")
  if not isinstance(dn.neck_features, int) or dn.neck_features < 1:
    raise UserError(f"config.dense.neck_features={dn.neck_features!r} must be a positive integer")
  stages = len(config.conv_features)
  if dn.backbone == "fpn":
    stages += len(dn.pyramid_features)
  strides = [2**i for i in range(1, stages + 1)]
  if dn.stride not in strides:
    raise UserError(
      f"config.dense.stride={dn.stride!r}: the output stride is 2 ** (pooled conv stages); "
      f"with {stages} conv stages use one of {strides}"
    )
  cells = dense.grid_size(config.canvas_size, dn.stride) ** 2 * (10 if config.scene.classify else 1)
  if not isinstance(dn.top_k, int) or not k <= dn.top_k <= cells:
    raise UserError(
      f"config.dense.top_k={dn.top_k!r} must be an integer from max_objects ({k}) to the "
      f"number of heatmap cells x classes ({cells})"
    )
  if not 0.0 < dn.score_threshold < 1.0:
    raise UserError(
      f"config.dense.score_threshold={dn.score_threshold!r} must lie strictly between 0 and 1"
    )
  if not 0.0 < dn.prior < 1.0:
    raise UserError(f"config.dense.prior={dn.prior!r} must lie strictly between 0 and 1")


def load_data(config: ml_collections.ConfigDict):
  """Training data and the fixed validation set, as numpy arrays (`parallel.replicate` puts
  them on the devices): (digits, labels, val) of MNIST, or for a scene config with
  config.data.train_path (val_path) a stored set (`load_set`) in place of the training
  digits and None for labels (of the test digits)."""
  if config.get("scene"):
    train_path, val_path = data_paths(config)
    need_mnist = [split for split, path in (("train", train_path), ("test", val_path)) if not path]
    digits = {s: mnist.load(s, mnist_dir=config.mnist_dir or None) for s in need_mnist}
    if train_path:
      train = (load_set(train_path, config), None)
    else:
      train = digits["train"]
    if val_path:
      val = load_set(val_path, config, limit=config.num_val)
    else:  # validation scenes are drawn from the test digits with a fixed key
      val = {"digits": digits["test"][0], "labels": digits["test"][1]}
    return (*train, val)
  train_digits, train_labels = mnist.load("train", mnist_dir=config.mnist_dir or None)
  test_digits, test_labels = mnist.load("test", mnist_dir=config.mnist_dir or None)
  if config.num_val > 0:
    test_digits, test_labels = test_digits[: config.num_val], test_labels[: config.num_val]
  val_key = jax.random.key(config.val_seed)
  val = {
    "digits": test_digits,
    "labels": test_labels,
    "xy": canvas.validation_offsets(val_key, len(test_labels), config.canvas_size),
  }
  return train_digits, train_labels, val


def load_set(path: str, config: ml_collections.ConfigDict, limit: int = -1) -> dict:
  """A dataset on disk (`jaxloc.datasets.read`) as a dict of numpy arrays for `canvas.
  stored_scene`: its first `limit` scenes (all if limit <= 0), with as many slots as the
  config's detector needs. Canvases of another size than the config's are refused."""
  data = datasets.read(path)
  if data.canvas_size != config.canvas_size:
    raise UserError(
      f"{path} holds {data.canvas_size}x{data.canvas_size} images but config.canvas_size="
      f"{config.canvas_size}; use --config.canvas_size={data.canvas_size}"
    )
  k, slots = data.valid.shape[1], config.scene.max_objects
  if config.head == "slots" and k > slots:
    raise UserError(
      f"{path} has up to {k} digits an image; the slot detector has "
      f"config.scene.max_objects={slots} slots (raise it, or use --config.head=dense)"
    )
  n = len(data.images) if limit <= 0 else min(limit, len(data.images))
  pad = lambda a: np.pad(a[:n], [(0, 0), (0, max(0, slots - k))] + [(0, 0)] * (a.ndim - 2))
  return {
    "images": data.images[:n],
    "box": pad(data.box),
    "label": pad(data.label),
    "valid": pad(data.valid),
  }


def export_scenes(config, num: int, split: str, seed: int) -> datasets.Dataset:
  """`num` scenes of a scene config from the `split` digits as a `datasets.Dataset` (uint8
  images), made as the validation chunks are (`evaluation.sampled_chunk` with `seed` as
  val_seed): with the test split, seed = val_seed and num = num_val, a run's validation set."""
  digits, labels = mnist.load(split, mnist_dir=config.mnist_dir or None)
  chunk = min(evaluation.SCENE_VAL_CHUNK, num)
  make_chunk = functools.partial(
    evaluation.sampled_chunk, sample_args=scene_args(config, chunk), val_seed=seed
  )
  parts = []
  for i in range(-(-num // chunk)):
    scene = jax.device_get(make_chunk({"digits": digits, "labels": labels}, i))
    scene["image"] = np.round(scene["image"][..., 0] * 255).astype(np.uint8)  # 1/4 the memory
    parts.append(scene)
  cat = lambda name: np.concatenate([p[name] for p in parts])[:num]
  return datasets.Dataset(
    images=cat("image"), box=cat("box"), label=cat("label"), valid=cat("valid")
  )
