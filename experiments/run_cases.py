"""Trains every localisation case on a fixed budget and writes a markdown table of its metrics.

    python -m experiments.run_cases --root=runs/cases --steps=1000 --num_val=2000 \\
      [--head=slots] [--set=learning_rate=1e-3 --set=lr_schedule=constant ...]

Cases (experiments/configs/): single (case 1), presence (case 2), digit128 (case 3 on
128x128; the seed's 75x75 protocol is digit.py), multi (case 4) and detect (up to 5
digits, scaled, tight boxes). Each trains `--steps` steps of batch 64 in 2 epochs and
is scored on `--num_val` fixed validation canvases, beside its trivial baselines
(the majority class / count / presence, and a fixed centre box of digit size).
`--head` picks the detector (default: each config's own, the dense one).
Writes ROOT/<case>/ (a normal workdir each) and ROOT/results.md.
"""

import importlib
import os
import time

import jax
from absl import flags

from experiments import cli
from jaxloc import configs, train, workdir
from jaxloc.errors import UserError

CASES = ("single", "presence", "digit128", "multi", "detect")  # the default table
MORE_CASES = ("crowd", "digit75")  # dense only: 20 digits on 256x256; the seed's 75x75 task
_ROOT = flags.DEFINE_string("root", "runs/cases", "Directory for one workdir per case.")
_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per case (batch 64).")
_NUM_VAL = flags.DEFINE_integer("num_val", 2000, "Validation canvases per case.")
_CASES = flags.DEFINE_list("cases", list(CASES), "Which cases to run.")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", -1, "Steps per call (-1: per backend).")
_HEAD = flags.DEFINE_enum(
  "head", None, list(configs.HEADS), "Detector of every case (default: own)."
)
_SET = flags.DEFINE_multi_string("set", [], "Config override for every case: field=value.")


def _row(name: str, head: str, m: dict, wall: float) -> str:
  f = lambda key: f"{m[key]:.3f}" if key in m else "–"
  presence = (
    f"acc {f('presence_accuracy')} (baseline {f('baseline_presence_accuracy')}), "
    f"P {f('presence_precision')}, R {f('presence_recall')}"
  )
  count = f"{f('count_accuracy')} (baseline {f('baseline_count_accuracy')})"
  if "class_accuracy" in m:
    presence += f"; class acc {f('class_accuracy')} (baseline {f('baseline_class_accuracy')})"
  cells = [
    presence,
    count,
    f"{f('mean_iou')} (baseline {f('baseline_mean_iou')})",
    f("iou_at_0_6"),
    f"{f('AP')} / {f('AP50')} / {f('AP75')}",
  ]
  return f"| {name}, {head} | " + " | ".join(cells) + f" | {wall:.0f} |"


def main(argv):
  del argv
  unknown = set(_CASES.value) - set(CASES + MORE_CASES)
  if unknown:
    choices = ", ".join(CASES + MORE_CASES)
    raise UserError(f"unknown cases {sorted(unknown)}; choose from {choices}")
  rows = [
    f"Budget: {_STEPS.value} steps of batch 64 per case, {_NUM_VAL.value} validation canvases, "
    f"{jax.device_count()} {jax.default_backend()} device(s).",
    "",
    "| case, head | presence / class | count accuracy | mean IoU (matched) | IoU >= 0.6 "
    "| AP / AP50 / AP75 | wall s |",
    "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name in _CASES.value:
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    config.epochs, config.steps_per_epoch = 2, max(1, _STEPS.value // 2)
    config.num_val, config.log_every = _NUM_VAL.value, 50
    config.checkpoint_every = config.steps_per_epoch
    config.steps_per_call = _STEPS_PER_CALL.value
    config.head = _HEAD.value or config.head
    cli.override(config, _SET.value)
    t = time.perf_counter()
    final = train.train_and_evaluate(configs.read(config), os.path.join(_ROOT.value, name))
    wall = time.perf_counter() - t
    rows.append(_row(name, config.head, final, wall))
    print(rows[-1], flush=True)
  table = "\n".join(rows) + "\n"
  workdir.write_bytes_atomic(os.path.join(_ROOT.value, "results.md"), table.encode())
  print(table)


if __name__ == "__main__":
  cli.run(main)
