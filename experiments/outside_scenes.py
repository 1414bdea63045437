"""Scores a trained run on scenes of the MNIST detection benchmark made outside jaxloc.

    python -m experiments.outside_scenes --workdir=DIR [--num=500] [--seed=0] [--out=FILE.json]

The scenes follow `generate_data.py` of github.com/hukkelas/MNIST-ObjectDetection, written
again here in numpy and independent of `jaxloc.canvas`: per canvas a count uniform in
[--min_count, --max_count] (0..19: the generator's first version); each digit a random MNIST
test digit resized to a square of side 15..99 px by cv2's INTER_LINEAR rule (half-pixel
centres, the border pixel repeated), placed at a uniform offset in [0, 300 - side), redrawn
while its square has IoU >= 0.25 with an earlier digit's box; ink added in float, clipped at
255 and truncated to uint8; the box the resized digit's columns and rows with ink (xyxy,
max exclusive). The run's `Predictor` answers; pycocotools scores every detection (COCO's
AP, AP50, AP75, AP_small, AP_medium; no ink box is larger than 96x96 px) and the kept
ones give the count accuracy and the class accuracy (each digit's class is that of the kept
detection of highest IoU with it, none kept: wrong; as the runs' own `class_accuracy`).
Needs pycocotools (the `dev` extra).
"""

import numpy as np
from absl import flags

from experiments import cli, coco_eval, generator
from jaxloc import boxes, inference, metrics, mnist
from jaxloc.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of a scene run with 300x300 canvases.")
_NUM = flags.DEFINE_integer("num", 500, "Scenes to make and score.")
_SEED = flags.DEFINE_integer("seed", 0, "numpy seed of the scenes.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 0, "Fewest digits per canvas.")
_MAX_COUNT = flags.DEFINE_integer("max_count", 19, "Most digits per canvas.")
_OUT = flags.DEFINE_string("out", "", "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["workdir"])

BATCH = 50  # canvases per Predictor call


def score(predictor, images, targets) -> dict:
  """COCO figures by pycocotools over every detection, and the count accuracy."""
  dets, gts, right, right_class = [], [], 0, 0
  for start in range(0, len(images), BATCH):
    out = predictor(images[start : start + BATCH])
    for j in range(len(out["count"])):
      n = start + j
      right += int(out["count"][j]) == len(targets[n])
      right_class += _right_classes(out["box"][j], out["label"][j], out["keep"][j], targets[n])
      for t in np.nonzero(out["score"][j] > 0)[0]:
        label, score_, box = int(out["label"][j, t]), float(out["score"][j, t]), out["box"][j, t]
        dets.append({"image_id": n, "category_id": label, "score": score_, "box": box})
  for n, objects in enumerate(targets):
    for label, *px in objects:
      gts.append({"image_id": n, "category_id": label, "box": np.array(px) / generator.CANVAS})
  gt, det_json = metrics.coco_json(dets, gts, generator.CANVAS, len(images), range(10))
  figures = coco_eval.stats(gt, det_json)
  figures["count_accuracy"] = right / len(images)
  figures["class_accuracy"] = right_class / max(len(gts), 1)
  figures["num_scenes"] = len(images)
  figures["num_digits"] = len(gts)
  return figures


def _right_classes(box_Tx4, label_T, keep_T, objects) -> int:
  """How many of a canvas's digits the kept detection of highest IoU names rightly."""
  if not objects or not keep_T.any():
    return 0
  truth = np.array([px for _, *px in objects], np.float32) / generator.CANVAS
  iou = np.asarray(boxes.pairwise_iou(truth, np.asarray(box_Tx4[keep_T], np.float32)))
  named = label_T[keep_T][np.argmax(iou, axis=1)]
  return int(np.sum(named == np.array([label for label, *_ in objects])))


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not 0 <= _MIN_COUNT.value <= _MAX_COUNT.value:
    raise UserError(
      f"--min_count={_MIN_COUNT.value} --max_count={_MAX_COUNT.value}: need 0 <= min <= max"
    )
  if _NUM.value < 1:
    raise UserError(f"--num={_NUM.value} must be positive")
  predictor = inference.Predictor.from_workdir(_WORKDIR.value)
  if predictor.canvas_size != generator.CANVAS or predictor.spec.scene is None:
    raise UserError(
      f"{_WORKDIR.value} is not a scene run on {generator.CANVAS}x{generator.CANVAS} canvases"
    )
  digits, labels = mnist.load("test", mnist_dir=predictor.spec.data.mnist_dir or None)
  rng = np.random.default_rng(_SEED.value)
  images, targets = generator.make_scenes(
    rng, digits, labels, _NUM.value, _MIN_COUNT.value, _MAX_COUNT.value
  )
  figures = score(predictor, images, targets)
  print(
    " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
  )
  if _OUT.value:
    cli.write_json(_OUT.value, figures)


if __name__ == "__main__":
  cli.run(main)
