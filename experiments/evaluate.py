"""Re-scores a trained workdir: python -m experiments.evaluate --workdir=DIR [--data=PATH].

Re-creates the fixed validation set from the workdir's config, scores the
trained parameters, and rewrites metrics.json (evaluation figures; the training
statistics of the run are kept) and the plots. The figures equal those of the
training run's final evaluation.

With --data (a scene run only), scores the run on a dataset on disk instead (`jaxloc.datasets`:
an MNIST-detection folder, a COCO folder or .json file) and writes the same figures, COCO
files and pictures to DIR/eval-<name>/ (name: the dataset's folder or file name); the run's
own files are not touched. The images must be the run's canvas size. A COCO file's images
are looked for beside it, then in images/ beside it, or in --image_root.
"""

import json
import os

from absl import flags

from experiments import cli
from jaxloc import configs, console, inference, loaders, parallel, tasks, workdir
from jaxloc import spec as specs
from jaxloc.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "IDX directory, if not the run's own.")
_DATA = flags.DEFINE_string("data", None, "Score on this dataset on disk (scene runs).")
_IMAGE_ROOT = flags.DEFINE_string(
  "image_root", None, "--data: the folder of a COCO file's images (default: beside it, images/)."
)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  work_dir = _WORKDIR.value
  if _IMAGE_ROOT.value and not _DATA.value:
    raise UserError("--image_root is where a dataset's images are: it needs --data")
  print(console.devices_line())
  predictor = inference.Predictor.from_workdir(work_dir)
  spec = predictor.spec
  if _MNIST_DIR.value:
    spec = specs.replace(spec, data={"mnist_dir": _MNIST_DIR.value})
  mesh = parallel.data_mesh()
  if _DATA.value:
    out_dir, spec, val = _on_dataset(spec, _DATA.value)
  else:
    out_dir, val = work_dir, loaders.load(spec)[2]
  val = parallel.replicate(val, mesh)
  task = tasks.build(spec)
  summary, per = task.make_evaluator(task.model.apply, mesh)(predictor.variables, val)
  path = lambda name: os.path.join(work_dir, name)
  with workdir.lock(work_dir):
    previous = (
      workdir.read_json(path(workdir.METRICS)) if os.path.exists(path(workdir.METRICS)) else {}
    )
    history = [r for r in workdir.read_jsonl(path(workdir.METRICS_LOG)) if "val/num_val" in r]
    os.makedirs(out_dir, exist_ok=True)
    task.plot_predictions(out_dir, val, per)
    task.write_outputs(out_dir, val, per, history)
    final = {**previous, **summary}
    if _DATA.value:
      final["data"] = os.path.abspath(_DATA.value)
    workdir.write_json(os.path.join(out_dir, workdir.METRICS), final)
  print(json.dumps(summary, indent=2, sort_keys=True))
  print(f"wrote metrics.json and the plots in {out_dir}")


def _on_dataset(spec, data_path: str):
  """(DIR/eval-<name>, the spec that scores all of the dataset, the dataset as the
  validation set), through the checks of a run's config."""
  if spec.scene is None:
    raise UserError("--data needs a scene run (detections); the seed's digit task has no scenes")
  if _IMAGE_ROOT.value:
    spec = specs.replace(spec, data={"image_root": _IMAGE_ROOT.value})
  val = loaders.load_set(data_path, spec)
  spec = configs.replace(spec, data={"val_path": data_path, "num_val": len(val["images"])})
  name = os.path.splitext(os.path.basename(os.path.normpath(data_path)))[0]
  return os.path.join(_WORKDIR.value, f"eval-{name}"), spec, val


if __name__ == "__main__":
  cli.run(main)
