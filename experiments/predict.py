"""Predicts digit and box (or, for a scene model, every detected digit) on image files.

    python -m experiments.predict --workdir=DIR IMAGE... --out=OUT.png

Images may be PNG or JPEG, greyscale or colour, any size: see jaxloc.images for
how each becomes a canvas (dark-on-light is inverted; a canvas-sized image is
used as is; others are centred, and scaled down only if larger than the canvas).
Prints one line per image (a scene model: its count, then one line per kept detection)
and draws the predicted boxes with class and score.
"""

import os

import numpy as np
from absl import flags

from experiments import cli
from jaxloc import images, inference, plots
from jaxloc.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
_OUT = flags.DEFINE_string("out", "predictions_on_files.png", "The picture to write.")
flags.mark_flags_as_required(["workdir"])


def _describe(out: dict, *index) -> str:
  x0, y0, x1, y1 = out["box_px"][index]
  return (
    f"digit {out['label'][index]} (p={out['score'][index]:.3f}) "
    f"box px (xmin={x0:.1f}, ymin={y0:.1f}, xmax={x1:.1f}, ymax={y1:.1f})"
  )


def main(argv):
  paths = argv[1:]
  if not paths:
    raise UserError("give one or more image files after the flags")
  predictor = inference.Predictor.from_workdir(_WORKDIR.value)
  canvases = np.stack([images.canvas_from_file(p, predictor.canvas_size) for p in paths])
  out = predictor(canvases)
  scenes = "keep" in out  # a scene model answers with detections and a count
  for i, path in enumerate(paths):
    if scenes:
      print(f"{path}: {out['count'][i]} digit(s)")
      for t in np.nonzero(out["keep"][i])[0]:
        print(f"  {_describe(out, i, t)}")
    else:
      print(f"{path}: {_describe(out, i)}")
  plots.plot_detections(
    canvases / 255.0,
    out["box"],
    out["label"],
    out["score"],
    _OUT.value,
    keep=out.get("keep"),
    titles=[os.path.basename(p) for p in paths],
  )
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
