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


# --- Detection: COCO-style average precision, and COCO JSON for checking it elsewhere ---

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 0.50:0.05:0.95
RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # COCO's 101-point interpolation


def _iou_matrix(a_Nx4: np.ndarray, b_Mx4: np.ndarray) -> np.ndarray:
  ix = np.clip(
    np.minimum(a_Nx4[:, None, 2], b_Mx4[None, :, 2])
    - np.maximum(a_Nx4[:, None, 0], b_Mx4[None, :, 0]),
    0,
    None,
  )
  iy = np.clip(
    np.minimum(a_Nx4[:, None, 3], b_Mx4[None, :, 3])
    - np.maximum(a_Nx4[:, None, 1], b_Mx4[None, :, 1]),
    0,
    None,
  )
  inter = ix * iy
  area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  union = area(a_Nx4)[:, None] + area(b_Mx4)[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _class_ap(dets: list, gts: dict, threshold: float) -> float:
  """AP of one class: dets = [(image, score, box)], gts = {image: [boxes]} (COCO matching)."""
  n_gt = sum(len(b) for b in gts.values())
  dets = sorted(dets, key=lambda d: -d[1])  # stable: ties keep input order, as COCO
  used = {img: np.zeros(len(b), bool) for img, b in gts.items()}
  tp = np.zeros(len(dets))
  for i, (img, _, box) in enumerate(dets):
    if img not in gts or len(gts[img]) == 0:
      continue
    ious = _iou_matrix(np.asarray([box]), np.asarray(gts[img]))[0]
    ious[used[img]] = -1.0
    best = int(np.argmax(ious))
    if ious[best] >= threshold:
      tp[i], used[img][best] = 1, True
  ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
  recall = ctp / n_gt
  precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
  precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
  at = np.searchsorted(recall, RECALL_POINTS, side="left")
  return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in at]))


def average_precision(detections: list[dict], ground_truth: list[dict]) -> dict[str, float]:
  """COCO-style AP, AP50, AP75 over all classes that have ground truth.

  detections: dicts with image_id, category_id, score, box (xyxy, any unit);
  ground_truth: dicts with image_id, category_id, box. Per class and IoU threshold,
  detections are matched greedily by score to the unmatched box of best IoU;
  precision is made monotone and read at 101 recall points; AP is averaged over
  classes, then thresholds. All boxes count (no COCO area ranges; all digits are small).
  """
  classes = sorted({g["category_id"] for g in ground_truth})
  table = np.zeros((len(IOU_THRESHOLDS), len(classes)))
  for c_i, c in enumerate(classes):
    gts: dict = {}
    for g in ground_truth:
      if g["category_id"] == c:
        gts.setdefault(g["image_id"], []).append(g["box"])
    dets = [(d["image_id"], d["score"], d["box"]) for d in detections if d["category_id"] == c]
    for t_i, t in enumerate(IOU_THRESHOLDS):
      table[t_i, c_i] = _class_ap(dets, gts, t)
  if not classes:
    return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
  per_threshold = table.mean(axis=1)
  return {
    "AP": float(per_threshold.mean()),
    "AP50": float(per_threshold[0]),
    "AP75": float(per_threshold[5]),
  }


def coco_json(
  detections: list[dict], ground_truth: list[dict], canvas_size: int, num_images: int, categories
) -> tuple[dict, list[dict]]:
  """(ground_truth.json, detections.json) in COCO format; boxes in pixels as [x, y, w, h]."""

  def xywh(box):
    x0, y0, x1, y1 = (float(v) * canvas_size for v in box)
    return [x0, y0, x1 - x0, y1 - y0]

  annotations = []
  for i, g in enumerate(ground_truth):
    bbox = xywh(g["box"])
    annotations.append(
      {
        "id": i + 1,
        "image_id": int(g["image_id"]),
        "category_id": int(g["category_id"]),
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": 0,
      }
    )
  gt = {
    "images": [{"id": i, "width": canvas_size, "height": canvas_size} for i in range(num_images)],
    "annotations": annotations,
    "categories": [{"id": int(c), "name": str(c)} for c in categories],
  }
  dets = [
    {
      "image_id": int(d["image_id"]),
      "category_id": int(d["category_id"]),
      "bbox": xywh(d["box"]),
      "score": float(d["score"]),
    }
    for d in detections
  ]
  return gt, dets
