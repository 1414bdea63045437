"""What a config asks for: its checks, its data, its batch sampler and its loss.

Only this module, `train_and_evaluate` and `model.create_model` read a config;
everything they call takes explicit arguments. A config with a `scene` field is
a presence / count / detection case (K slots); without one it is the seed's task,
one digit per canvas.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from jaxloc import canvas, losses, mnist, parallel
from jaxloc.errors import UserError


def task_functions(config: ml_collections.ConfigDict):
  """(sample_fn(data_key, step, digits, labels) -> batch, loss_fn(outputs, batch)) for the
  config's task: one digit per canvas (the seed), or scenes of up to K digits when
  `config.scene` is set (scene digits are drawn with replacement, key fold_in(data_key, step))."""
  if config.get("scene"):
    scene = functools.partial(canvas.sample_scene, **scene_args(config))
    sample_fn = lambda data_key, step, *data: scene(jax.random.fold_in(data_key, step), *data)
    loss_fn = functools.partial(losses.scene_loss, **dict(scene_loss_args(config)))
  else:
    sample_fn = functools.partial(
      canvas.training_batch, batch_size=config.batch_size, canvas_size=config.canvas_size
    )
    loss_fn = functools.partial(
      losses.total_loss, class_weight=config.class_loss_weight, box_weight=config.box_loss_weight
    )
  return sample_fn, loss_fn


def scene_loss_args(config: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
  """Keyword arguments of `losses.scene_loss` for the config, as hashable (name, value) pairs."""
  sc = config.scene
  return (
    ("classify", sc.classify),
    ("count_weight", sc.count_loss_weight),
    ("objectness_weight", sc.objectness_loss_weight),
    ("class_weight", config.class_loss_weight),
    ("box_weight", config.box_loss_weight),
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
    tight_boxes=sc.box_type == "tight",
    max_overlap=sc.max_overlap,
  )


# Steps per compiled call when config.steps_per_call = -1. CPU: a lax.scan of 10
# steps ran 1.7x as fast as one step per call on the 2-core CPU machine (632 vs 372
# images/s, `python -m experiments.benchmark`). Accelerators: a scan of 50 steps removes
# per-step dispatch (not measured in this repository: no GPU was lent to this work).
DEFAULT_STEPS_PER_CALL = {"cpu": 10}
DEFAULT_STEPS_PER_CALL_ACCELERATOR = 50


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
  if not 0.0 <= config.get("ema_decay", 0.0) < 1.0:
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
