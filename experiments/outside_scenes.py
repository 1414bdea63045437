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
from jaxloc import inference, mnist
from jaxloc.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of a scene run with 300x300 canvases.")
_NUM = flags.DEFINE_integer("num", 500, "Scenes to make and score.")
_SEED = flags.DEFINE_integer("seed", 0, "numpy seed of the scenes.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 0, "Fewest digits per canvas.")
_MAX_COUNT = flags.DEFINE_integer("max_count", 19, "Most digits per canvas.")
_OUT = flags.DEFINE_string("out", "", "Also write the figures to this JSON file.")
flags.mark_flags_as_required(["workdir"])


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
  figures = coco_eval.score_scenes(predictor, images, targets, generator.CANVAS)
  print(
    " | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
  )
  if _OUT.value:
    cli.write_json(_OUT.value, figures)


if __name__ == "__main__":
  cli.run(main)
