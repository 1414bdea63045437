"""Out-of-distribution check: digits rendered from matplotlib's fonts instead of handwriting.

    python -m experiments.font_digits --workdir=DIR [--per_digit=20]

Renders 0-9 in DejaVu Sans / Serif / Sans Mono, normal and bold (60 digits),
fits each into 20x20 inside 28x28 as MNIST was made, places each on
`per_digit` canvases at fixed random offsets (as the validation set is made),
scores the trained model and writes DIR/font_digits.json and font_digits.png.
"""

import json
import os

import jax
import numpy as np
from absl import flags

from experiments import cli
from jaxloc import canvas, evaluation, images, inference, plots, tasks, workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
_PER_DIGIT = flags.DEFINE_integer("per_digit", 20, "Canvases per rendered digit.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  predictor = inference.Predictor.from_workdir(_WORKDIR.value)
  spec = predictor.spec
  digits, labels = images.font_digits()
  digits, labels = np.repeat(digits, _PER_DIGIT.value, 0), np.repeat(labels, _PER_DIGIT.value)
  val = {
    "digits": jax.numpy.asarray(digits),
    "labels": jax.numpy.asarray(labels),
    "xy": canvas.validation_offsets(
      jax.random.key(spec.data.val_seed), len(labels), spec.data.canvas_size
    ),
  }
  net = tasks.build(spec).model
  summary, per = evaluation.evaluate(
    net.apply, predictor.variables, val, canvas_size=spec.data.canvas_size, batch_size=len(labels)
  )
  summary["num_font_digits"] = len(labels) // _PER_DIGIT.value
  workdir.write_json(os.path.join(_WORKDIR.value, "font_digits.json"), summary)
  pick = np.arange(0, len(labels), _PER_DIGIT.value)[::3][:16]
  rendered = canvas.render(
    val["digits"][pick], val["labels"][pick], val["xy"][pick], canvas_size=spec.data.canvas_size
  )
  plots.plot_predictions(
    np.asarray(rendered["image"][..., 0]),
    np.asarray(rendered["box"]),
    per["pred_box"][pick],
    per["pred_label"][pick],
    per["iou"][pick],
    os.path.join(_WORKDIR.value, "font_digits.png"),
    true_label_N=labels[pick],
  )
  print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == "__main__":
  cli.run(main)
