"""Re-scores a trained workdir: python -m experiments.evaluate --workdir=DIR.

Re-creates the fixed validation set from the workdir's config, scores the
trained parameters, and rewrites metrics.json (evaluation figures; the training
statistics of the run are kept) and the plots. The figures equal those of the
training run's final evaluation.
"""

import json
import os

from absl import flags

from experiments import cli
from jaxloc import console, inference, parallel, tasks, workdir
from jaxloc.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "IDX directory, if not the run's own.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  work_dir = _WORKDIR.value
  print(console.devices_line())
  predictor = inference.Predictor.from_workdir(work_dir)
  config = predictor.config
  if _MNIST_DIR.value:
    config.mnist_dir = _MNIST_DIR.value
  mesh = parallel.data_mesh()
  _, _, val = parallel.replicate(tasks.load_data(config), mesh)
  task = tasks.build(config)
  summary, per = task.make_evaluator(task.model.apply, mesh)(predictor.params, val)
  path = lambda name: os.path.join(work_dir, name)
  with workdir.lock(work_dir):
    previous = (
      workdir.read_json(path(workdir.METRICS)) if os.path.exists(path(workdir.METRICS)) else {}
    )
    history = [r for r in workdir.read_jsonl(path(workdir.METRICS_LOG)) if "val/num_val" in r]
    task.plot_predictions(work_dir, val, per)
    task.write_outputs(work_dir, val, per, history)
    final = {**previous, **summary}
    workdir.write_json(path(workdir.METRICS), final)
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(f"rewrote metrics.json and the plots in {work_dir}")


if __name__ == "__main__":
  cli.run(main)
