"""Validation metrics of the single-digit localiser: accuracy and IoU statistics.

`batch_sums` runs on the device inside the jitted evaluation and returns sums
(so a padded last batch cannot skew a mean); `summarize` turns the summed
totals and the per-canvas IoUs into the numbers a run reports.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxloc import boxes, losses

IOU_THRESHOLD = 0.6  # the seed's "correct box" threshold


def per_example(outputs: dict[str, jax.Array], batch) -> dict[str, jax.Array]:
  """Predicted class, its probability, predicted box and IoU with the true box, per canvas."""
  probs = jax.nn.softmax(outputs["logits"], axis=-1)
  return {
    "pred_label": jnp.argmax(probs, axis=-1).astype(jnp.int32),
    "score": jnp.max(probs, axis=-1),
    "pred_box": outputs["box"],
    "iou": boxes.iou(outputs["box"], batch["box"]),
  }


def batch_sums(outputs: dict[str, jax.Array], batch, mask_B: jax.Array) -> dict[str, jax.Array]:
  """Sums over the canvases where `mask` is True."""
  ex = per_example(outputs, batch)
  m = mask_B.astype(jnp.float32)
  return {
    "n": jnp.sum(m),
    "correct": jnp.sum(m * (ex["pred_label"] == batch["label"])),
    "iou": jnp.sum(m * ex["iou"]),
    "iou_at_0_6": jnp.sum(m * (ex["iou"] >= IOU_THRESHOLD)),
    "class_loss": jnp.sum(m * losses.class_loss(outputs["logits"], batch["label"])),
    "box_loss": jnp.sum(m * losses.box_loss(outputs["box"], batch["box"])),
  }


def summarize(sums: dict[str, float], iou_N: np.ndarray) -> dict[str, float]:
  """Final numbers from summed totals and all per-canvas IoUs."""
  n = float(sums["n"])
  return {
    "accuracy": float(sums["correct"]) / n,
    "mean_iou": float(sums["iou"]) / n,
    "median_iou": float(np.median(iou_N)),
    "iou_at_0_6": float(sums["iou_at_0_6"]) / n,
    "class_loss": float(sums["class_loss"]) / n,
    "box_loss": float(sums["box_loss"]) / n,
    "num_val": int(n),
  }
