"""The dense detector's targets, loss and decoding, side by side (CenterNet, "Objects as Points").

A canvas of side H is covered by a G x G grid of cells, G = ceil(H / stride); cell (i, j)
(row i, column j) covers canvas pixels [stride*j, stride*(j+1)) x [stride*i, stride*(i+1)).
An object belongs to the cell that holds its box centre. Per cell the model predicts

- heatmap logits [C]: sigmoid = the probability that an object of class c is centred
  here; trained against Gaussian bumps (1 at the centre cell, sigma = box side / 6 along
  each axis) with CenterNet's penalty-reduced focal loss;
- a box [4] = (dx, dy, log w, log h): the centre's offset inside the cell and the box's
  size, both in cell units (1 = `stride` pixels); trained by L1 at centre cells only, and
  optionally by the generalized IoU of the box it decodes to.

`decode` turns outputs into the top-k detections (boxes in the `jaxloc.boxes` convention);
`answers` turns detections into the cases' answers with a score threshold.

Shape letters: B batch, K objects, G grid side, C classes, T detections kept (top-k).
"""

import functools

import jax
import jax.numpy as jnp

from jaxloc import boxes

FOCAL_ALPHA = 2.0  # CenterNet's focal exponent on (1 - p) at centres and p elsewhere
FOCAL_BETA = 4.0  # exponent of the penalty reduction (1 - target) near centres


def grid_size(canvas_size: int, stride: int) -> int:
  return -(-canvas_size // stride)


@functools.partial(jax.jit, static_argnames=("canvas_size", "stride", "num_classes"))
def encode_targets(
  box_BxKx4: jax.Array,
  label_BxK: jax.Array,
  valid_BxK: jax.Array,
  *,
  canvas_size: int,
  stride: int,
  num_classes: int,
) -> dict[str, jax.Array]:
  """Dense targets of a batch of scenes.

  Returns heatmap [B,G,G,C] (max over objects of each object's Gaussian in its class
  channel, exactly 1 at centre cells), box [B,G,G,4] (the regression target at centre
  cells, 0 elsewhere) and centre [B,G,G] (True at the centre cell of a valid object).
  `num_classes` = 1 makes the heatmap class-agnostic (labels are ignored).
  """
  g = grid_size(canvas_size, stride)
  px = box_BxKx4 * canvas_size / stride  # the box in cell units
  cx, cy = (px[..., 0] + px[..., 2]) / 2, (px[..., 1] + px[..., 3]) / 2
  w, h = px[..., 2] - px[..., 0], px[..., 3] - px[..., 1]
  ix = jnp.clip(jnp.floor(cx), 0, g - 1).astype(jnp.int32)
  iy = jnp.clip(jnp.floor(cy), 0, g - 1).astype(jnp.int32)
  cell = jnp.arange(g, dtype=jnp.int32)
  dx = (cell[None, None, :] - ix[..., None]).astype(jnp.float32)  # [B, K, G]
  dy = (cell[None, None, :] - iy[..., None]).astype(jnp.float32)
  sx = jnp.maximum(w / 6, 0.1)[..., None]  # floor: no division by zero for tiny boxes
  sy = jnp.maximum(h / 6, 0.1)[..., None]
  bump_x, bump_y = jnp.exp(-(dx**2) / (2 * sx**2)), jnp.exp(-(dy**2) / (2 * sy**2))
  bump = bump_y[..., :, None] * bump_x[..., None, :]  # [B, K, G(y), G(x)]
  bump = jnp.where(valid_BxK[..., None, None], bump, 0.0)
  label = label_BxK if num_classes > 1 else jnp.zeros_like(label_BxK)
  onehot = jax.nn.one_hot(label, num_classes)  # [B, K, C]
  heatmap = jnp.max(bump[..., None] * onehot[:, :, None, None, :], axis=1)

  b, k = valid_BxK.shape
  flat = iy * g + ix  # [B, K]
  target = jnp.stack(
    [cx - ix, cy - iy, jnp.log(jnp.maximum(w, 1e-3)), jnp.log(jnp.maximum(h, 1e-3))], -1
  )
  rows = jnp.repeat(jnp.arange(b)[:, None], k, axis=1)
  # Invalid objects write to a dump cell past the grid, dropped below.
  flat = jnp.where(valid_BxK, flat, g * g)
  box = jnp.zeros((b, g * g + 1, 4)).at[rows, flat].set(target)[:, : g * g]
  centre = jnp.zeros((b, g * g + 1), bool).at[rows, flat].set(True)[:, : g * g]
  return {"heatmap": heatmap, "box": box.reshape(b, g, g, 4), "centre": centre.reshape(b, g, g)}


def focal_loss(logits_BxGxGxC: jax.Array, target_BxGxGxC: jax.Array) -> jax.Array:
  """CenterNet's penalty-reduced focal loss, summed over cells and classes (divide by the
  number of objects). Cells with target 1 are centres; the others are negatives whose
  penalty is reduced by (1 - target)^beta near a centre. (optax's `sigmoid_focal_loss` is
  RetinaNet's, without the penalty reduction.)"""
  p = jax.nn.sigmoid(logits_BxGxGxC)
  log_p, log_not_p = jax.nn.log_sigmoid(logits_BxGxGxC), jax.nn.log_sigmoid(-logits_BxGxGxC)
  is_centre = target_BxGxGxC >= 1.0
  pos = (1 - p) ** FOCAL_ALPHA * log_p
  neg = (1 - target_BxGxGxC) ** FOCAL_BETA * p**FOCAL_ALPHA * log_not_p
  return -jnp.sum(jnp.where(is_centre, pos, neg))


@functools.partial(jax.jit, static_argnames=("canvas_size", "stride", "num_classes", "giou_weight"))
def scene_loss(
  outputs: dict[str, jax.Array],
  scene,
  *,
  canvas_size: int,
  stride: int,
  num_classes: int,
  heatmap_weight: float,
  box_weight: float,
  giou_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Focal heatmap loss + L1 box loss at centre cells (+ `giou_weight` x (1 - GIoU) of the
  decoded box at centre cells, when it is not 0), each divided by the number of objects in
  the batch (at least 1: a batch of empty canvases has only the heatmap's negative term, and
  box losses of exactly zero)."""
  t = encode_targets(
    scene["box"],
    scene["label"],
    scene["valid"],
    canvas_size=canvas_size,
    stride=stride,
    num_classes=num_classes,
  )
  n = jnp.maximum(jnp.sum(t["centre"]), 1).astype(jnp.float32)
  heat = focal_loss(outputs["heatmap"], t["heatmap"]) / n
  l1 = jnp.sum(jnp.abs(outputs["box"] - t["box"]), axis=-1)
  box = jnp.sum(jnp.where(t["centre"], l1, 0.0)) / n
  loss = heatmap_weight * heat + box_weight * box
  parts = {"heatmap_loss": heat, "box_loss": box}
  if giou_weight:
    centre = t["centre"][..., None]
    pred = _cell_box(jnp.where(centre, outputs["box"], 0.0))  # no exp of other cells' sizes
    g = boxes.giou(pred, _cell_box(t["box"]))
    parts["giou_loss"] = jnp.sum(jnp.where(t["centre"], 1.0 - g, 0.0)) / n
    loss = loss + giou_weight * parts["giou_loss"]
  return loss, {"loss": loss, **parts}


def _cell_box(reg: jax.Array) -> jax.Array:
  """A regression (dx, dy, log w, log h) as an xyxy box in cell units, relative to its cell."""
  size = jnp.exp(reg[..., 2:])
  return jnp.concatenate([reg[..., :2] - size / 2, reg[..., :2] + size / 2], -1)


@functools.partial(jax.jit, static_argnames=("k", "canvas_size", "stride"))
def decode(
  outputs: dict[str, jax.Array], *, k: int, canvas_size: int, stride: int
) -> dict[str, jax.Array]:
  """The k best detections per canvas, fixed shapes: box [B,T,4] (normalised xyxy),
  label [B,T] int32, score [B,T] (sigmoid of the heatmap at a local 3x3 maximum of its
  class channel; other cells score 0), sorted by score, and primary [B,T]: the detection
  is also the maximum over all classes in its 3x3 neighbourhood (class-agnostic peak).

  Every class's peaks are detections (a second guess of the class still counts for AP, as
  in CenterNet); `answers` keeps only primary ones, one per object."""
  p = jax.nn.sigmoid(outputs["heatmap"])
  b, g, _, c = p.shape
  max_3x3 = lambda x: jax.lax.reduce_window(
    x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"
  )
  score = jnp.where(p == max_3x3(p), p, 0.0).reshape(b, g * g * c)
  primary = (p == max_3x3(jnp.max(p, axis=-1, keepdims=True))).reshape(b, g * g * c)
  score, index = jax.lax.top_k(score, k)
  cell, label = index // c, index % c
  iy, ix = cell // g, cell % g
  reg = jnp.take_along_axis(outputs["box"].reshape(b, g * g, 4), cell[..., None], axis=1)
  cx, cy = ix + reg[..., 0], iy + reg[..., 1]
  w, h = jnp.exp(reg[..., 2]), jnp.exp(reg[..., 3])
  box = boxes.cxcywh_to_xyxy(jnp.stack([cx, cy, w, h], -1)) * stride / canvas_size
  primary = jnp.take_along_axis(primary, index, axis=1)
  return {"box": box, "label": label.astype(jnp.int32), "score": score, "primary": primary}


@jax.jit
def answers(detections: dict[str, jax.Array], threshold: float) -> dict[str, jax.Array]:
  """The cases' answers from `decode`'s detections: keep [B,T] (primary and score >=
  threshold), count [B] (detections kept) and presence [B] (count > 0)."""
  keep = detections["primary"] & (detections["score"] >= threshold)
  count = jnp.sum(keep, axis=-1).astype(jnp.int32)
  return {"keep": keep, "count": count, "presence": count > 0}
