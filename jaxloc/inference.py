"""Using a trained model: `Predictor.from_workdir(path)(images)` -> dict of numpy arrays.

    from jaxloc.inference import Predictor
    predict = Predictor.from_workdir("runs/digit")
    out = predict(images)   # [N,H,W] or [N,H,W,1]; uint8 0..255 or float 0..1
    out["label"], out["probs"], out["score"], out["box"], out["box_px"]

Boxes follow `jaxloc.boxes`: normalised (xmin, ymin, xmax, ymax); `box_px` is the
same box in pixels of the canvas. The model is jitted once per batch shape.

For a scene model (the presence / count / detection cases) the result also holds
`count` [N], `count_probs` [N,K+1], `presence` [N], `objectness` [N,K], and the
per-slot `label`, `probs`, `score` (objectness x class probability) and boxes
shaped [N,K,...]. Slots are unordered: keep those with a high `score`, or the
`count` slots of highest `objectness`.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

from jaxloc import boxes, model, workdir
from jaxloc.errors import UserError


def load_params(work_dir: str, config):
  """The trained parameters of a workdir (params.msgpack), checked against the config."""
  path = os.path.join(work_dir, workdir.PARAMS)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: the run in {work_dir!r} has not finished training")
  like = model.init_params(jax.random.key(0), model.create_model(config), config.canvas_size)
  with open(path, "rb") as f:
    data = f.read()
  try:
    return serialization.from_bytes(like, data)
  except Exception as e:  # msgpack raises several types on a damaged file
    raise UserError(f"{path}: cannot be read as this config's parameters ({e})") from None


def load_config(work_dir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(work_dir):
    raise UserError(f"workdir {work_dir!r} does not exist")
  path = os.path.join(work_dir, workdir.CONFIG)
  if not os.path.exists(path):
    raise UserError(f"{path} not found: {work_dir!r} is not a jaxloc workdir")
  return ml_collections.ConfigDict(workdir.read_json(path))


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
  """A trained localiser: call it on a batch of canvases."""

  def __init__(self, config, params):
    self.config = ml_collections.ConfigDict(dict(config))
    self.canvas_size = int(self.config.canvas_size)
    self.params = params
    self._apply = jax.jit(model.create_model(self.config).apply)  # compiled once per batch shape

  @classmethod
  def from_workdir(cls, work_dir: str) -> "Predictor":
    config = load_config(work_dir)
    return cls(config, load_params(work_dir, config))

  def __call__(self, images) -> dict[str, np.ndarray]:
    x = to_canvas_batch(images, self.canvas_size)
    out = self._apply({"params": self.params}, x)
    probs = jax.nn.softmax(out["logits"], axis=-1)
    if "count_logits" in out:  # a scene model: K slots
      count_probs = jax.nn.softmax(out["count_logits"], axis=-1)
      objectness = jax.nn.sigmoid(out["objectness"])
      return {
        "count": np.asarray(jnp.argmax(count_probs, -1), np.int32),
        "count_probs": np.asarray(count_probs),
        "presence": np.asarray(jnp.argmax(count_probs, -1) > 0),
        "objectness": np.asarray(objectness),
        "label": np.asarray(jnp.argmax(probs, -1), np.int32),
        "probs": np.asarray(probs),
        "score": np.asarray(objectness * jnp.max(probs, -1)),
        "box": np.asarray(out["box"]),
        "box_px": np.asarray(boxes.to_pixels(out["box"], self.canvas_size)),
      }
    return {
      "label": np.asarray(jnp.argmax(probs, -1), np.int32),
      "probs": np.asarray(probs),
      "score": np.asarray(jnp.max(probs, -1)),
      "box": np.asarray(out["box"]),
      "box_px": np.asarray(boxes.to_pixels(out["box"], self.canvas_size)),
    }
