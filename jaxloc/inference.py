"""Using a trained model: `Predictor.from_workdir(path)(images)` -> dict of numpy arrays.

    from jaxloc.inference import Predictor
    predict = Predictor.from_workdir("runs/digit")
    out = predict(images)   # [N,H,W] or [N,H,W,1]; uint8 0..255 or float 0..1
    out["label"], out["probs"], out["score"], out["box"], out["box_px"]

Boxes follow `jaxloc.boxes`: normalised (xmin, ymin, xmax, ymax); `box_px` is the
same box in pixels of the canvas. The model is jitted once per batch shape.

A scene model (the presence / count / detection cases) answers with detections
shaped [N,T,...]: `box`, `box_px`, `label`, `score`, and `keep` (the detections that
are its answer), plus the cases' answers `count` [N] (detections kept) and `presence`
[N] (count > 0). The dense detector (`DenseHead`) gives its top-k
detections (T = its `top_k`, sorted by score; `keep` = score >=
its `score_threshold`); the slot detector gives its K slots (`keep` = the
`count` slots of highest `objectness`; also `count_probs`, `objectness`, `probs`).
The answers come from `jaxloc.metrics` (`digit_answers`, `dense_answers`,
`slot_answers`), the same functions the evaluator uses.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from jaxloc import boxes, configs, model, tasks, workdir
from jaxloc.errors import UserError
from jaxloc.spec import Spec


def load_variables(work_dir: str, spec: Spec, net=None) -> dict:
  """The trained variables of a workdir (`model.variables`: params.msgpack, and
  batch_stats.msgpack for a model with BatchNorm), checked against its spec's model (`net`,
  when the caller has built it)."""
  net = tasks.build(spec).model if net is None else net
  # shapes only: nothing is compiled or run
  like = model.init_variables.eval_shape(jax.random.key(0), net, spec.data.canvas_size)
  files = {"params": workdir.PARAMS, "batch_stats": workdir.BATCH_STATS}
  return {name: _load(work_dir, files[name], tree) for name, tree in like.items()}


def _load(work_dir: str, name: str, like):
  """One msgpack file of a workdir, read into the structure of `like` and checked."""
  path = os.path.join(work_dir, name)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: the run in {work_dir!r} has not finished training")
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = serialization.from_bytes(like, data)
  except Exception as e:  # msgpack raises several types on a damaged file
    raise UserError(f"{path}: cannot be read as this config's parameters ({e})") from None
  for (where, want), got in zip(
    jax.tree_util.tree_leaves_with_path(like), jax.tree_util.tree_leaves(tree), strict=True
  ):
    if np.shape(got) != want.shape:
      raise UserError(
        f"{path}: parameter {jax.tree_util.keystr(where)} has shape {np.shape(got)} where "
        f"the config in {work_dir!r} makes {want.shape}; the file is another model's"
      )
  return tree


def load_spec(work_dir: str) -> Spec:
  """The checked spec of a workdir's config.json (`configs.read`: upgraded, checked)."""
  if not os.path.isdir(work_dir):
    raise UserError(f"workdir {work_dir!r} does not exist")
  path = os.path.join(work_dir, workdir.CONFIG)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: {work_dir!r} is not a jaxloc workdir")
  return configs.read(workdir.read_json(path))


def to_canvas_batch(images, canvas_size: int) -> jax.Array:
  """Checks user images and returns float32 [N, H, W, 1] in [0, 1]."""
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    raise UserError(f"images must be a numpy or JAX array, got {type(images).__name__}")
  shape, dtype = tuple(images.shape), np.dtype(images.dtype)
  if len(shape) == 4 and shape[-1] == 1:
    shape = shape[:3]
  expected = f"[N,{canvas_size},{canvas_size}] or [N,{canvas_size},{canvas_size},1]"
  if len(shape) != 3 or shape[1:] != (canvas_size, canvas_size):
    raise UserError(f"images have shape {tuple(images.shape)}; this model takes {expected}")
  if shape[0] == 0:
    raise UserError("images is an empty batch (N = 0)")
  if dtype == np.uint8:
    x = jnp.asarray(images, jnp.float32) / 255.0
  elif np.issubdtype(dtype, np.floating):
    x = jnp.asarray(images, jnp.float32)
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
      raise UserError(
        f"float images must lie in [0, 1], got values in [{lo}, {hi}]; divide uint8 pixels by 255"
      )
  else:
    raise UserError(f"images have dtype {dtype}; use uint8 (0..255) or float (0..1)")
  return x.reshape(shape + (1,))


class Predictor:
  """A trained model: call it on a batch of canvases."""

  def __init__(self, spec: Spec, variables: dict, task: tasks.Task | None = None):
    """`variables`: the model's (`model.variables(params, batch_stats)`)."""
    self.spec, self.variables = spec, variables
    self.canvas_size = spec.data.canvas_size
    task = tasks.build(spec) if task is None else task
    # model + answers, compiled once per batch shape
    self._predict = jax.jit(lambda v, x: task.answer(task.model.apply(v, x)))

  @classmethod
  def from_workdir(cls, work_dir: str) -> "Predictor":
    spec = load_spec(work_dir)
    task = tasks.build(spec)
    return cls(spec, load_variables(work_dir, spec, task.model), task)

  def __call__(self, images) -> dict[str, np.ndarray]:
    batch = to_canvas_batch(images, self.canvas_size)
    out = jax.device_get(self._predict(self.variables, batch))
    out = {k: np.asarray(v) for k, v in out.items()}
    out["box_px"] = np.asarray(boxes.to_pixels(out["box"], self.canvas_size))
    return out
