"""Reading a config: `read(config)` turns an `ml_collections` ConfigDict (or a workdir's
config.json, as a dict) into a checked, frozen `spec.Spec`. It is the one place that reads a
config's fields.

It fills the fields an older config.json lacks (`upgrade`), rejects settings that cannot
work with one line that says how to fix them (`errors.UserError`), resolves the
per-backend defaults (steps per compiled call, how replica members share a program),
computes the derived numbers once (total steps, validation scenes) and parses
`config.vary` (the values replica members list) once.
"""

import copy
import dataclasses

import jax

from jaxloc import canvas, dense, model, parallel, scenes
from jaxloc import spec as spec_lib
from jaxloc.errors import UserError
from jaxloc.spec import (
  Data,
  DenseHead,
  DigitHead,
  Optimizer,
  Replicas,
  Scene,
  Schedule,
  SlotHead,
  Spec,
  members,
)

HEADS = ("dense", "slots")
BOX_TYPES = ("patch", "tight", "ink")
SCHEDULES = ("constant", "cosine")
REPLICA_MODES = ("vmap", "map")
VARY_EXAMPLE = '--config.vary="learning_rate=1e-3,3e-3 ema_decay=0.99,0.999"'
SCENE_VAL_DEFAULT = 10_000  # validation scenes when config.num_val <= 0

# Steps per compiled call when config.steps_per_call = -1. The CPU runs a loop of 10 steps
# faster than one step per call (docs/speed.md); an accelerator ran one step per call about
# as fast as 50 (docs/speed.md), and a step without a loop waits for no loop condition.
STEPS_PER_CALL = {"cpu": 10}
STEPS_PER_CALL_ACCELERATOR = 1
# How replica members share one program when config.replica_mode = "auto" (docs/speed.md):
# vmap batches the members' matrix products into one.
REPLICA_MODE = {"cpu": "vmap"}
REPLICA_MODE_ACCELERATOR = "vmap"

# Fields added after runs were written, with the value that reproduces those runs.
ADDED_FIELDS = {
  "ema_decay": 0.0,
  "lr_schedule": "constant",
  "warmup_steps": 0,
  "replicas": 1,
  "replica_mode": "auto",
  "vary": "",
}
ADDED_SCENE_FIELDS = {"head": "slots", "data": {}}  # scene runs: slots, no data on disk
ADDED_NESTED_FIELDS = {
  "scene": {"paste_mode": "max"},
  "data": {"train_path": "", "val_path": "", "image_root": ""},
  "dense": {
    "backbone": "single",
    "pyramid_features": (128, 128),
    "neck_features": 128,
    "norm": "none",
    "giou_loss_weight": 0.0,
  },
}


def upgrade(config: dict) -> dict:
  """A saved config.json as a dict of today's fields: what a workdir written before a
  field existed ran with (scene runs then had only the slot detector and no datasets)."""
  added = dict(ADDED_FIELDS, **(ADDED_SCENE_FIELDS if config.get("scene") else {}))
  config = {**copy.deepcopy(added), **config}
  for group, fields in ADDED_NESTED_FIELDS.items():
    if group in config:
      config[group] = {**fields, **config[group]}
  return config


def read(config) -> Spec:
  """The checked spec of a ConfigDict or a config dict (config.json, upgraded here)."""
  c = upgrade(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  _check_run(c)
  canvas.check_canvas_size(c["canvas_size"])
  scene = _scene(c) if c.get("scene") else None
  head = _head(c) if scene else _digit_head(c)
  parallel.check_divisible(c["batch_size"])
  parallel.check_divisible(c["eval_batch_size"], "eval_batch_size")
  total = c["epochs"] * c["steps_per_epoch"]
  num_val = c["num_val"]
  if scene:
    num_val = num_val if num_val > 0 else SCENE_VAL_DEFAULT
  data = c.get("data") or {}
  spec = Spec(
    seed=c["seed"],
    data=Data(
      mnist_dir=c["mnist_dir"],
      canvas_size=c["canvas_size"],
      batch_size=c["batch_size"],
      eval_batch_size=c["eval_batch_size"],
      num_val=num_val,
      val_seed=c["val_seed"],
      num_plot=c["num_plot"],
      train_path=data.get("train_path", ""),
      val_path=data.get("val_path", ""),
      image_root=data.get("image_root", ""),
    ),
    schedule=Schedule(
      epochs=c["epochs"],
      steps_per_epoch=c["steps_per_epoch"],
      total_steps=total,
      steps_per_call=_backend_default(
        c["steps_per_call"], -1, STEPS_PER_CALL, STEPS_PER_CALL_ACCELERATOR
      ),
      log_every=c["log_every"],
      checkpoint_every=c["checkpoint_every"],
      keep_checkpoints=c["keep_checkpoints"],
    ),
    opt=Optimizer(
      learning_rate=c["learning_rate"],
      lr_schedule=c["lr_schedule"],
      warmup_steps=c["warmup_steps"],
      total_steps=total,
      ema_decay=c["ema_decay"],
    ),
    head=head,
    scene=scene,
    replicas=Replicas(
      count=c["replicas"],
      mode=_backend_default(c["replica_mode"], "auto", REPLICA_MODE, REPLICA_MODE_ACCELERATOR),
    ),
    fields=c,
  )
  spec = dataclasses.replace(
    spec, replicas=dataclasses.replace(spec.replicas, varied=_vary(c, spec))
  )
  _check_members(spec)
  return spec


def replace(spec: Spec, **groups) -> Spec:
  """`spec.replace(spec, **groups)` read again: the changed run, through every check."""
  return read(spec_lib.replace(spec, **groups).fields)


def _backend_default(value, auto, table: dict, accelerator):
  return table.get(jax.default_backend(), accelerator) if value == auto else value


def _positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_run(c: dict) -> None:
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
    if not _positive_int(c[name]):
      raise UserError(f"config.{name}={c[name]!r} must be a positive integer")
  if c["steps_per_call"] != -1 and not c["steps_per_call"] >= 1:
    raise UserError(
      f"config.steps_per_call={c['steps_per_call']!r} must be -1 (per backend) or positive"
    )
  _check_hyperparameters(c["learning_rate"], c["ema_decay"])
  if c["lr_schedule"] not in SCHEDULES:
    raise UserError(f"config.lr_schedule={c['lr_schedule']!r}: use 'constant' or 'cosine'")
  if not isinstance(c["warmup_steps"], int) or c["warmup_steps"] < 0:
    raise UserError(f"config.warmup_steps={c['warmup_steps']!r} must be an integer >= 0")
  if not isinstance(c["num_plot"], int) or c["num_plot"] < 0:
    raise UserError(f"config.num_plot={c['num_plot']!r} must be an integer >= 0 (0: draw none)")
  if c["replica_mode"] not in ("auto", *REPLICA_MODES):
    raise UserError(f"config.replica_mode={c['replica_mode']!r}: use 'auto', 'vmap' or 'map'")


def _check_hyperparameters(learning_rate, ema_decay) -> None:
  if not learning_rate > 0:
    raise UserError(f"config.learning_rate={learning_rate!r} must be positive")
  if not 0.0 <= ema_decay < 1.0:
    raise UserError(f"config.ema_decay={ema_decay!r} must lie in [0, 1) (0 = no moving average)")


def _digit_head(c: dict) -> DigitHead:
  return DigitHead(
    conv_features=tuple(c["conv_features"]),
    dense_features=c["dense_features"],
    class_loss_weight=c["class_loss_weight"],
    box_loss_weight=c["box_loss_weight"],
  )


def _scene(c: dict) -> Scene:
  scene = c["scene"]
  k = scene["max_objects"]
  if not isinstance(k, int) or k < 1:
    raise UserError(f"config.scene.max_objects={k!r} must be a positive integer")
  probs = tuple(scene["count_probs"])
  if len(probs) != k + 1 or min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
    raise UserError(
      f"config.scene.count_probs={probs} must be {k + 1} probabilities (counts 0..{k}) "
      "that sum to 1"
    )
  lo, hi = tuple(scene["size_range"])
  if not 1 <= lo <= hi:
    raise UserError(f"config.scene.size_range=({lo}, {hi}) must satisfy 1 <= min <= max")
  if scene["box_type"] not in BOX_TYPES:
    raise UserError(f"config.scene.box_type={scene['box_type']!r}: use one of {BOX_TYPES}")
  if scene["paste_mode"] not in canvas.PASTE_MODES:
    raise UserError(
      f"config.scene.paste_mode={scene['paste_mode']!r}: use one of {canvas.PASTE_MODES}"
    )
  if not -1 <= scene["target_class"] <= 9:
    raise UserError(f"config.scene.target_class={scene['target_class']}: use -1 (any) or 0..9")
  if scene["target_class"] < 0 and scene["distractor_prob"] > 0:
    raise UserError("config.scene.distractor_prob needs a config.scene.target_class >= 0")
  scenes.check_scene(c["canvas_size"], k + (scene["distractor_prob"] > 0), hi, scene["max_overlap"])
  if c["head"] not in HEADS:
    raise UserError(f"config.head={c['head']!r}: use one of {', '.join(map(repr, HEADS))}")
  return Scene(
    max_objects=k,
    count_probs=probs,
    target_class=scene["target_class"],
    distractor_prob=scene["distractor_prob"],
    size_range=(lo, hi),
    box_type=scene["box_type"],
    paste_mode=scene["paste_mode"],
    max_overlap=scene["max_overlap"],
    classify=scene["classify"],
  )


def _head(c: dict) -> SlotHead | DenseHead:
  if c["head"] == "slots":
    return SlotHead(
      conv_features=tuple(c["conv_features"]),
      dense_features=c["dense_features"],
      class_loss_weight=c["class_loss_weight"],
      box_loss_weight=c["box_loss_weight"],
      count_loss_weight=c["scene"]["count_loss_weight"],
      objectness_loss_weight=c["scene"]["objectness_loss_weight"],
    )
  d = c["dense"]
  _check_dense(c, d)
  return DenseHead(
    conv_features=tuple(c["conv_features"]),
    backbone=d["backbone"],
    pyramid_features=tuple(d["pyramid_features"]),
    neck_features=d["neck_features"],
    norm=d["norm"],
    stride=d["stride"],
    context_features=tuple(d["context_features"]),
    top_k=d["top_k"],
    score_threshold=d["score_threshold"],
    heatmap_loss_weight=d["heatmap_loss_weight"],
    box_loss_weight=d["box_loss_weight"],
    giou_loss_weight=d["giou_loss_weight"],
    prior=d["prior"],
  )


def _check_dense(c: dict, d: dict) -> None:
  """The rules of `config.dense` (d) on the canvas, conv stages and scene of config c."""
  if d["backbone"] not in model.BACKBONES:
    raise UserError(f"config.dense.backbone={d['backbone']!r}: use one of {model.BACKBONES}")
  if d["norm"] not in model.NORMS:
    raise UserError(f"config.dense.norm={d['norm']!r}: use one of {model.NORMS}")
  if not isinstance(d["neck_features"], int) or d["neck_features"] < 1:
    raise UserError(f"config.dense.neck_features={d['neck_features']!r} must be a positive integer")
  stages = len(c["conv_features"])
  if d["backbone"] == "fpn":
    stages += len(d["pyramid_features"])
  strides = [2**i for i in range(1, stages + 1)]
  if d["stride"] not in strides:
    raise UserError(
      f"config.dense.stride={d['stride']!r}: the output stride is 2 ** (pooled "
      f"conv stages); with {stages} conv stages use one of {strides}"
    )
  k, classes = c["scene"]["max_objects"], 10 if c["scene"]["classify"] else 1
  cells = dense.grid_size(c["canvas_size"], d["stride"]) ** 2 * classes
  if not isinstance(d["top_k"], int) or not k <= d["top_k"] <= cells:
    raise UserError(
      f"config.dense.top_k={d['top_k']!r} must be an integer from max_objects "
      f"({k}) to the number of heatmap cells x classes ({cells})"
    )
  if not 0.0 < d["score_threshold"] < 1.0:
    raise UserError(
      f"config.dense.score_threshold={d['score_threshold']!r} must lie strictly between 0 and 1"
    )
  if not d["giou_loss_weight"] >= 0.0:
    raise UserError(
      f"config.dense.giou_loss_weight={d['giou_loss_weight']!r} must be 0 (off) or positive"
    )
  if not 0.0 < d["prior"] < 1.0:
    raise UserError(f"config.dense.prior={d['prior']!r} must lie strictly between 0 and 1")


def _vary(c: dict, spec: Spec) -> tuple[tuple[str, tuple[float, ...]], ...]:
  """`config.vary` parsed: "learning_rate=1e-3,3e-3 ema_decay=0.99,0.999" (entries apart by
  spaces or `;`) -> ((field, one value per member), ...)."""
  text, allowed = c.get("vary") or "", spec.hyperparameters()
  out = {}
  for entry in text.replace(";", " ").split():
    name, _, values = entry.partition("=")
    if name not in allowed:
      raise UserError(
        f"config.vary={text!r}: {entry!r} is not <field>=<value>,<value>,... of a field this "
        f"config's members may vary ({', '.join(allowed)}); e.g. {VARY_EXAMPLE}"
      )
    if name in out:
      raise UserError(f"config.vary={text!r} lists {name} twice")
    try:
      out[name] = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise UserError(f"config.vary={text!r}: the values of {name} must be numbers") from None
    if len(out[name]) != c["replicas"]:
      raise UserError(
        f"config.vary lists {len(out[name])} values of {name} for config.replicas="
        f"{c['replicas']}: one value per member (--config.replicas={len(out[name])})"
      )
  return tuple(out.items())


def _check_members(spec: Spec) -> None:
  """Each replica member's listed values, as a UserError naming the member."""
  specs = members(spec)
  for i, m in enumerate(specs):
    try:
      _check_hyperparameters(m.opt.learning_rate, m.opt.ema_decay)
    except UserError as e:
      raise UserError(f"config.vary: member {i}: {e}") from None
  if len({m.opt.ema_decay > 0 for m in specs}) > 1:
    raise UserError(
      "config.vary: ema_decay mixes 0 (no moving average) with averages; the members share "
      "one train state layout, so list only values > 0, or only 0"
    )
