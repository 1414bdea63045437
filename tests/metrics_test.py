import numpy as np
import pytest

from jaxloc import metrics


def _gt(img, cls, box):
  return {"image_id": img, "category_id": cls, "box": box}


def _det(img, cls, score, box):
  return {"image_id": img, "category_id": cls, "score": score, "box": box}


def test_perfect_detections_give_ap_one():
  gts = [_gt(0, 1, [0, 0, 10, 10]), _gt(1, 2, [5, 5, 15, 15])]
  dets = [_det(g["image_id"], g["category_id"], 0.9, g["box"]) for g in gts]
  assert metrics.average_precision(dets, gts) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}


def test_false_positive_ranked_first_halves_ap():
  # Precision after each detection: 0/1 then 1/2; the envelope is 0.5 at every recall.
  gts = [_gt(0, 0, [0, 0, 10, 10])]
  dets = [_det(0, 0, 0.9, [20, 20, 30, 30]), _det(0, 0, 0.8, [0, 0, 10, 10])]
  assert metrics.average_precision(dets, gts)["AP50"] == pytest.approx(0.5)


def test_missed_object_caps_recall():
  # Recall reaches 0.5 with precision 1: recall points 0.00..0.50 (51 of 101) score 1.
  gts = [_gt(0, 0, [0, 0, 10, 10]), _gt(1, 0, [0, 0, 10, 10])]
  dets = [_det(0, 0, 0.9, [0, 0, 10, 10])]
  assert metrics.average_precision(dets, gts)["AP"] == pytest.approx(51 / 101)


def test_iou_thresholds():
  # IoU 0.72 matches at 0.50, 0.55, 0.60, 0.65, 0.70: 5 of 10 thresholds.
  gts = [_gt(0, 0, [0, 0, 10, 10])]
  dets = [_det(0, 0, 0.9, [0, 0, 10, 7.2])]
  ap = metrics.average_precision(dets, gts)
  assert ap == pytest.approx({"AP": 0.5, "AP50": 1.0, "AP75": 0.0})


def test_duplicate_detection_is_a_false_positive_and_classes_are_averaged():
  gts = [_gt(0, 0, [0, 0, 10, 10]), _gt(0, 1, [20, 0, 30, 10])]
  dets = [
    _det(0, 0, 0.9, [0, 0, 10, 10]),
    _det(0, 0, 0.8, [0, 0, 10, 10]),  # duplicate: FP after the TP, AP of class 0 stays 1
    _det(0, 1, 0.7, [0, 20, 10, 30]),  # wrong place: class 1 AP 0
  ]
  assert metrics.average_precision(dets, gts)["AP"] == pytest.approx(0.5)


def test_matches_pycocotools():
  coco = pytest.importorskip("pycocotools.coco")
  cocoeval = pytest.importorskip("pycocotools.cocoeval")
  rng = np.random.default_rng(0)
  gts, dets = [], []
  for img in range(40):
    for _ in range(rng.integers(0, 3)):
      x, y = rng.uniform(0, 0.7, 2)
      box = [x, y, x + 0.22, y + 0.22]
      cls = int(rng.integers(0, 3))
      gts.append(_gt(img, cls, box))
      jitter = rng.normal(0, 0.03, 4)
      dets.append(
        _det(
          img,
          cls if rng.uniform() < 0.8 else (cls + 1) % 3,
          float(rng.uniform()),
          list(np.asarray(box) + jitter),
        )
      )
    if rng.uniform() < 0.3:
      x, y = rng.uniform(0, 0.7, 2)
      dets.append(
        _det(img, int(rng.integers(0, 3)), float(rng.uniform()), [x, y, x + 0.2, y + 0.2])
      )
  ours = metrics.average_precision(dets, gts)
  gt_json, det_json = metrics.coco_json(dets, gts, 128, 40, range(3))
  api = coco.COCO()
  api.dataset = gt_json
  api.createIndex()
  ev = cocoeval.COCOeval(api, api.loadRes(det_json), "bbox")
  ev.params.areaRng = [[0, 1e10]]
  ev.params.areaRngLbl = ["all"]
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  assert ours["AP"] == pytest.approx(ev.stats[0], abs=1e-6)
  assert ours["AP50"] == pytest.approx(ev.stats[1], abs=1e-6)
  assert ours["AP75"] == pytest.approx(ev.stats[2], abs=1e-6)


def test_scene_summary_of_scenes_without_digits():
  """An all-empty validation set (e.g. count_probs=(1, 0, ...)) gives figures, not a crash."""
  n, k, t = 4, 2, 3
  per = {
    "valid": np.zeros((n, k), bool),
    "count": np.zeros(n, np.int64),
    "pred_count": np.array([0, 0, 1, 0]),
    "label": np.zeros((n, k), np.int64),
    "box": np.zeros((n, k, 4)),
    "matched_box": np.zeros((n, k, 4)),
    "matched_label": np.full((n, k), -1),
    "det_box": np.full((n, t, 4), 0.2) + np.array([0, 0, 0.1, 0.1]),
    "det_label": np.zeros((n, t), np.int64),
    "det_score": np.full((n, t), 0.5),
  }
  out = metrics.scene_summary(per, classify=True, digit_size=0.2)
  assert out["count_accuracy"] == 0.75 and out["presence_precision"] == 0.0
  assert out["class_accuracy"] == 0.0
  assert out["baseline_class_accuracy"] == 0.0 and out["mean_iou"] == 0.0 and out["AP"] == 0.0
