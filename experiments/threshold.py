"""Count accuracy of a trained dense detector at several score thresholds, on training scenes.

    python -m experiments.threshold --workdir=DIR [--thresholds=0.1,0.2,0.3,0.4,0.5]

Scores `config.num_val` scenes drawn from the MNIST *training* digits (never the test
digits the validation set is made of) at each threshold and prints count and presence
accuracy, and the middle of the thresholds that reach the best count accuracy, so the
default `config.dense.score_threshold` is chosen without looking at the validation set.
Writes nothing.
"""

import json

import jax
from absl import flags

from experiments import cli
from jaxloc import configs, inference, mnist, tasks
from jaxloc import spec as specs
from jaxloc.errors import UserError
from jaxloc.spec import DenseHead

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir of a dense-detector run.")
_THRESHOLDS = flags.DEFINE_list("thresholds", ["0.1", "0.2", "0.3", "0.4", "0.5"], "Thresholds.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  predictor = inference.Predictor.from_workdir(_WORKDIR.value)
  spec = predictor.spec
  if not isinstance(spec.head, DenseHead):
    raise UserError(f"{_WORKDIR.value!r} is not a run of the dense detector (config.head)")
  try:
    thresholds = [float(t) for t in _THRESHOLDS.value]
  except ValueError:
    raise UserError(f"--thresholds={_THRESHOLDS.value}: give numbers in (0, 1)") from None
  # a run validated on a stored set: sweep on training scenes all the same
  spec = specs.replace(spec, data={"val_path": ""})
  digits, labels = mnist.load("train", mnist_dir=spec.data.mnist_dir or None)
  train_scenes = {"digits": jax.numpy.asarray(digits), "labels": jax.numpy.asarray(labels)}
  rows = {}
  for threshold in thresholds:
    task = tasks.build(configs.replace(spec, head={"score_threshold": threshold}))
    summary, _ = task.make_evaluator(task.model.apply)(predictor.variables, train_scenes)
    rows[threshold] = {k: summary[k] for k in ("count_accuracy", "presence_accuracy")}
    print(f"threshold {threshold}: {json.dumps(rows[threshold])}", flush=True)
  top = max(r["count_accuracy"] for r in rows.values())
  tied = sorted(t for t, r in rows.items() if r["count_accuracy"] == top)
  best = tied[(len(tied) - 1) // 2]  # the middle of the best thresholds: furthest from both edges
  print(f"best count accuracy on {spec.data.num_val} training scenes ({top}): thresholds {tied}; ")
  print(f"the middle one: {best}")


if __name__ == "__main__":
  cli.run(main)
