"""Validation metrics: accuracy and IoU statistics of the seed's task; count, presence,
matched IoU and COCO-style AP of scenes (what the model answers: `jaxloc.answers`).

`batch_sums` runs on the device inside the jitted evaluation and returns sums
(so a padded last batch cannot skew a mean); `summarize` turns the summed
totals and the per-canvas IoUs into the numbers a run reports.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxloc import answers, boxes, losses

IOU_THRESHOLD = 0.6  # the seed's "correct box" threshold


def per_example(outputs: dict[str, jax.Array], batch) -> dict[str, jax.Array]:
  """Predicted class, its probability, predicted box and IoU with the true box, per canvas."""
  ans = answers.digit_answers(outputs)
  return {
    "pred_label": ans["label"],
    "score": ans["score"],
    "pred_box": ans["box"],
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


def _class_precision(dets: list, gts: dict) -> np.ndarray:
  """Interpolated precision of one class at the 101 recall points, per IoU threshold
  [len(IOU_THRESHOLDS), 101] (the mean of a row is that threshold's AP).

  dets = [(image, score, box)], gts = {image: [boxes]}. COCO's matching: within each image,
  detections in order of score take the unmatched box of highest IoU (>= the threshold);
  then all detections are ranked by score (stable: ties keep input order, as COCO).
  Vectorised over images and thresholds: step r matches every image's r-th detection."""
  n_gt = sum(len(b) for b in gts.values())
  t = len(IOU_THRESHOLDS)
  if not dets:
    return np.zeros((t, len(RECALL_POINTS)))
  order = np.argsort(-np.array([d[1] for d in dets]), kind="stable")
  images = sorted({d[0] for d in dets})
  row = {img: i for i, img in enumerate(images)}
  image_n = np.array([row[dets[i][0]] for i in order])  # image row of each ranked detection
  rank = np.zeros(len(order), int)  # its rank within its image
  seen = np.zeros(len(images), int)
  for n, i in enumerate(image_n):
    rank[n], seen[i] = seen[i], seen[i] + 1
  det_box = np.zeros((len(images), seen.max(), 4))
  det_box[image_n, rank] = [dets[i][2] for i in order]
  g = max([len(gts.get(img, [])) for img in images] + [1])
  gt_box, gt_ok = np.zeros((len(images), g, 4)), np.zeros((len(images), g), bool)
  for img, i in row.items():
    k = len(gts.get(img, []))
    if k:
      gt_box[i, :k], gt_ok[i, :k] = gts[img], True
  ious = np.where(
    gt_ok[:, None, :],
    boxes.iou(*np.broadcast_arrays(det_box[:, :, None, :], gt_box[:, None, :, :])),
    -1.0,
  )
  used = np.zeros((t, len(images), g), bool)
  tp_at = np.zeros((t, len(images), seen.max()), bool)
  for r in range(seen.max()):
    iou = np.where(used, -1.0, ious[None, :, r, :])  # [T, I, G]
    best = np.argmax(iou, axis=-1)
    hit = np.take_along_axis(iou, best[..., None], -1)[..., 0] >= IOU_THRESHOLDS[:, None]
    hit &= (r < seen)[None, :]
    tp_at[:, :, r] = hit
    used[np.arange(t)[:, None], np.arange(len(images))[None, :], best] |= hit
  tp = tp_at[:, image_n, rank].astype(float)  # [T, detections in score order]
  ctp, cfp = np.cumsum(tp, axis=1), np.cumsum(1 - tp, axis=1)
  recall = ctp / max(n_gt, 1)
  precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
  precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
  out = np.zeros((t, len(RECALL_POINTS)))
  for i in range(t):
    at = np.searchsorted(recall[i], RECALL_POINTS, side="left")
    inside = at < precision.shape[1]
    out[i, inside] = precision[i, at[inside]]
  return out


def average_precision(
  detections: list[dict], ground_truth: list[dict], *, with_curve: bool = False
) -> dict:
  """COCO-style AP, AP50, AP75 over all classes that have ground truth.

  detections: dicts with image_id, category_id, score, box (xyxy, any unit);
  ground_truth: dicts with image_id, category_id, box. Per class and IoU threshold,
  detections are matched greedily by score to the unmatched box of best IoU;
  precision is made monotone and read at 101 recall points; AP is averaged over
  classes, then thresholds. All boxes count (no COCO area ranges; all digits are small).
  """
  classes = sorted({g["category_id"] for g in ground_truth})
  table = np.zeros((len(IOU_THRESHOLDS), len(classes), len(RECALL_POINTS)))
  for c_i, c in enumerate(classes):
    gts: dict = {}
    for g in ground_truth:
      if g["category_id"] == c:
        gts.setdefault(g["image_id"], []).append(g["box"])
    dets = [(d["image_id"], d["score"], d["box"]) for d in detections if d["category_id"] == c]
    table[:, c_i] = _class_precision(dets, gts)
  if not classes:
    return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
  per_threshold = table.mean(axis=(1, 2))
  result = {
    "AP": float(per_threshold.mean()),
    "AP50": float(per_threshold[0]),
    "AP75": float(per_threshold[5]),
  }
  if with_curve:  # precision at the 101 recall points, IoU 0.5, mean over classes
    result["pr50"] = table[0].mean(axis=0).tolist()
  return result


def coco_json(
  detections: list[dict], ground_truth: list[dict], canvas_size: int, num_images: int, categories
) -> tuple[dict, list[dict]]:
  """(ground_truth.json, detections.json) in COCO format; boxes in pixels as [x, y, w, h]."""

  def xywh(box):  # in pixels, computed in float64 as COCO's own tools do
    return boxes.xyxy_to_xywh(np.asarray(box, np.float64) * canvas_size).tolist()

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


def scene_detections(per: dict, classify: bool) -> tuple[list[dict], list[dict]]:
  """Every detection with a positive score, and every valid target as ground truth.

  category = predicted class, or 0 for class-agnostic cases.
  """
  dets, gts = [], []
  for i, j in zip(*np.nonzero(per["det_score"] > 0), strict=True):
    dets.append(
      {
        "image_id": int(i),
        "category_id": int(per["det_label"][i, j]) if classify else 0,
        "score": float(per["det_score"][i, j]),
        "box": per["det_box"][i, j].tolist(),
      }
    )
  for i, j in zip(*np.nonzero(per["valid"]), strict=True):
    gts.append(
      {
        "image_id": int(i),
        "category_id": int(per["label"][i, j]) if classify else 0,
        "box": per["box"][i, j].tolist(),
      }
    )
  return dets, gts


def scene_summary(per: dict, classify: bool, digit_size: float) -> dict[str, float]:
  """Count / presence / class accuracy, IoU of matched digits, AP, and trivial baselines."""
  valid = per["valid"]
  ious = boxes.iou(per["matched_box"], per["box"])[valid]
  true_p, pred_p = per["count"] > 0, per["pred_count"] > 0
  tp = np.sum(true_p & pred_p)
  out = {
    "num_val": int(len(per["count"])),
    "count_accuracy": float(np.mean(per["count"] == per["pred_count"])),
    "presence_accuracy": float(np.mean(true_p == pred_p)),
    "presence_precision": float(tp / max(np.sum(pred_p), 1)),
    "presence_recall": float(tp / max(np.sum(true_p), 1)),
    "mean_iou": float(ious.mean()) if ious.size else 0.0,
    "median_iou": float(np.median(ious)) if ious.size else 0.0,
    "iou_at_0_6": float(np.mean(ious >= IOU_THRESHOLD)) if ious.size else 0.0,
    # Trivial baselines: the majority count / presence, a fixed centre box of digit size.
    "baseline_count_accuracy": float(np.bincount(per["count"]).max() / len(per["count"])),
    "baseline_presence_accuracy": float(max(true_p.mean(), 1 - true_p.mean())),
  }
  half = digit_size / 2
  centre = np.broadcast_to(
    np.array([0.5 - half, 0.5 - half, 0.5 + half, 0.5 + half]), per["box"].shape
  )
  out["baseline_mean_iou"] = (
    float(boxes.iou(centre, per["box"])[valid].mean()) if (valid.any()) else 0.0
  )
  if classify:
    labels = per["label"][valid]
    right = per["matched_label"][valid] == labels
    out["class_accuracy"] = float(right.mean()) if labels.size else 0.0
    out["baseline_class_accuracy"] = (
      float(np.bincount(labels).max() / labels.size) if labels.size else 0.0
    )
  dets, gts = scene_detections(per, classify)
  out.update(average_precision(dets, gts))
  return out
