"""COCO AP by pycocotools (the [dev] extra) of COCO JSON as `jaxloc.metrics.coco_json` and a
run's ground_truth.json / detections.json hold it: the experiment scripts' one use of it; and
the scoring of a Predictor on scenes made outside jaxloc (`experiments.outside_scenes`)."""

import contextlib
import io

import numpy as np

from jaxloc import boxes, metrics
from jaxloc.errors import UserError

NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium")  # no digit is "large" (> 96^2 px)


def stats(gt: dict, detections: list) -> dict[str, float]:
  """pycocotools' AP over all, small and medium boxes (-1 where a size has no box)."""
  try:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
  except ImportError:
    raise UserError("pycocotools is not installed: pip install -e '.[dev]'") from None
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    result = COCOeval(coco, coco.loadRes(detections) if detections else COCO(), "bbox")
    result.evaluate()
    result.accumulate()
    result.summarize()
  return {k: float(v) for k, v in zip(NAMES, result.stats[:5], strict=True)}


BATCH = 50  # canvases per Predictor call


def score_scenes(predictor, images, targets, canvas: int) -> dict:
  """COCO figures by pycocotools over every detection of `predictor` (a `Predictor`, or any
  callable answering as one) on uint8 `images`, whose `targets` are per canvas (label, xyxy
  px) lists; the count accuracy and the class accuracy (`_right_classes`)."""
  dets, gts, right, right_class = [], [], 0, 0
  for start in range(0, len(images), BATCH):
    out = predictor(images[start : start + BATCH])
    for j in range(len(out["count"])):
      n = start + j
      right += int(out["count"][j]) == len(targets[n])
      right_class += _right_classes(
        out["box"][j], out["label"][j], out["keep"][j], targets[n], canvas
      )
      for t in np.nonzero(out["score"][j] > 0)[0]:
        label, score_, box = int(out["label"][j, t]), float(out["score"][j, t]), out["box"][j, t]
        dets.append({"image_id": n, "category_id": label, "score": score_, "box": box})
  for n, objects in enumerate(targets):
    for label, *px in objects:
      gts.append({"image_id": n, "category_id": label, "box": np.array(px) / canvas})
  gt, det_json = metrics.coco_json(dets, gts, canvas, len(images), range(10))
  figures = stats(gt, det_json)
  figures["count_accuracy"] = right / len(images)
  figures["class_accuracy"] = right_class / max(len(gts), 1)
  figures["num_scenes"] = len(images)
  figures["num_digits"] = len(gts)
  return figures


def _right_classes(box_Tx4, label_T, keep_T, objects, canvas: int) -> int:
  """How many of a canvas's digits the kept detection of highest IoU names rightly."""
  if not objects or not keep_T.any():
    return 0
  truth = np.array([px for _, *px in objects], np.float32) / canvas
  iou = np.asarray(boxes.pairwise_iou(truth, np.asarray(box_Tx4[keep_T], np.float32)))
  named = label_T[keep_T][np.argmax(iou, axis=1)]
  return int(np.sum(named == np.array([label for label, *_ in objects])))
