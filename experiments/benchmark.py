"""Speed and memory of jaxloc against the seed's Keras/tf.data pipeline, on identical digits.

    python -m experiments.benchmark --steps=200 --out=runs/benchmark.json

Each measurement runs in its own subprocess (so peak resident memory is its
own) on the same MNIST training digits, batch 64, canvas 75:

  canvas_jaxloc   canvases/s of jaxloc.canvas.training_batch, the training sampler (jitted,
                  on the device), one batch of 64 per call
  canvas_tfdata   canvases/s of the seed's tf.data pipeline: map(pad_to_bounding_box at
                  random offsets) -> shuffle(5000) -> batch(64) -> prefetch
  train_jaxloc    training images/s, steady state (compile time reported apart), with the
                  backend's default steps per call; train_jaxloc_1: one step per call
  train_keras     training images/s of the seed's Keras model under model.fit on that pipeline,
                  TensorFlow's default kernels for this CPU (oneDNN only where it has
                  AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX); train_keras_onednn: oneDNN on
  keras_protocol  the seed's Keras model trained on the seed's protocol (10 epochs of --steps;
                  the protocol: --steps=937), scored on jaxloc's validation canvases of the
                  seed's task: accuracy, mean IoU, IoU >= 0.6 (the Keras rows of the tables)
  matmul          float32 GFLOP/s of a 2048x2048 matmul: the machine's FLOP bound
  train_multi_dense, train_multi_slots
                  training images/s of case 4 (`multi`, 128x128 scenes) with the dense
                  detector and with the slot detector
  train_md_single, train_md_fpn, train_md_fpn_group, train_md_fpn_batch
                  training images/s on the MNIST detection benchmark's layout (300x300,
                  0-19 digits of 15-99 px, batch 16) with the single-scale network, the
                  feature pyramid, and the pyramid with GroupNorm / BatchNorm
  profile         ms per batch: forward and gradient, jaxloc's conv vs XLA's native conv
  step_profile    ms per step of the seed model in each of XLA's compiled operations (a
                  jax.profiler trace): where the step's time goes on this CPU
  step_profile_multi
                  the same for case 4's dense detector (`multi`, 128x128)
  read_dataset    seconds to read a detection dataset from disk (`jaxloc.datasets.read`):
                  --data=PATH, or 1,000 scenes of the benchmark layout exported first
  replicas, replicas_multi
                  training images/s of --replicas members in one program (jax.vmap and
                  lax.map) against one run, and the program's memory (XLA's arguments +
                  temporaries): the seed model, and `multi` with the dense detector
  evaluate_two, evaluate_two_multi
                  seconds to score two models (a run's averaged and raw weights): apart,
                  and in one compiled call per batch (what a run does)
  evaluate_batch  seconds to score one model on the seed's 10,000 validation canvases per
                  eval_batch_size (500, 250, 100, 50)

Rows that need TensorFlow are skipped (and the table says so) without the [tfds] extra.
Prints the figures as a markdown table (a row per part, then the ratios); --out writes
all figures as JSON. With --rounds=N the parts run N times in turn (so a drift in this
machine's speed reaches each alike): each figure is the median of the rounds, each round's
figures are kept, and jaxloc's training speed is divided by Keras' round by round. The CPU
(model, family, AVX flags) is printed and kept with them.
"""

import json
import os
import resource
import statistics
import subprocess
import sys

from absl import flags

from experiments import bench_profile, bench_scenes, bench_seed, cli
from jaxloc.errors import UserError

_PART = flags.DEFINE_string("part", None, "Internal: run one measurement and print JSON.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed batches / training steps per measurement.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "IDX directory (default: $JAXLOC_MNIST_DIR).")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", -1, "jaxloc steps per call (-1: auto).")
_PARTS = flags.DEFINE_list("parts", None, "Run only these measurements (default: all).")
_DATA = flags.DEFINE_string("data", None, "read_dataset: the dataset folder to read.")
_REPLICAS = flags.DEFINE_integer("replicas", 4, "replicas, replicas_multi: members per program.")
_ROUNDS = flags.DEFINE_integer(
  "rounds", 1, "Run the parts this many times in turn; figures: the median of the rounds."
)

NOT_RUN = "not run (--parts)"
PARTS = (
  "canvas_jaxloc",
  "canvas_tfdata",
  "train_jaxloc",
  "train_jaxloc_1",
  "train_keras",
  "train_keras_onednn",
  "keras_protocol",
  "matmul",
  "profile",
  "step_profile",
  "step_profile_multi",
  "train_multi_dense",
  "train_multi_slots",
  "train_md_single",
  "train_md_fpn",
  "train_md_fpn_group",
  "train_md_fpn_batch",
  "read_dataset",
  "replicas",
  "replicas_multi",
  "evaluate_two",
  "evaluate_two_multi",
  "evaluate_batch",
)


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_part(name: str, steps: int) -> dict:
  module = next(m for m in (bench_seed, bench_scenes, bench_profile) if hasattr(m, name))
  result = getattr(module, name)(steps)
  result["peak_rss_mb"] = _peak_rss_mb()
  return result


def _subprocess(name: str) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "experiments.benchmark",
    f"--part={name}",
    f"--steps={_STEPS.value}",
    f"--steps_per_call={_STEPS_PER_CALL.value}",
    f"--replicas={_REPLICAS.value}",
  ]
  if _DATA.value:
    cmd.append(f"--data={_DATA.value}")
  if _MNIST_DIR.value:
    cmd.append(f"--mnist_dir={_MNIST_DIR.value}")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"skipped": tail[:200]}
  return json.loads(lines[-1])


def _report(results: dict) -> str:
  """The figures as markdown: one row per part (its numbers, rounded), then the ratios."""
  rows = ["| part | figures |", "| --- | --- |"]
  for name in PARTS:
    r = results[name]
    if r.get("skipped") == NOT_RUN:
      continue
    if "skipped" in r:
      rows.append(f"| {name} | skipped: {r['skipped']} |")
      continue
    numbers = {k: v for k, v in r.items() if isinstance(v, int | float) and k != "rounds"}
    rows.append(f"| {name} | " + ", ".join(f"{k} {v:,.4g}" for k, v in numbers.items()) + " |")
  for name, r in results["ratios"].items():
    each = ", ".join(f"{x:.2f}x" for x in r["rounds"])
    rows.append(f"| {name} | {each}; median {r['median']:.2f}x |")
  return "\n".join(rows)


def cpu() -> dict:
  """This machine's CPU as Linux reports it: model name, family and model, and which of the
  vector instruction sets that decide the speed of XLA's and TensorFlow's kernels it has."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
  except OSError:
    return {"model_name": "unknown (no /proc/cpuinfo)"}
  flags_ = set(info.get("flags", "").split())
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
  return {
    "model_name": info.get("model name", "?"),
    "family": info.get("cpu family", "?"),
    "model": info.get("model", "?"),
    "flags": [f for f in wanted if f in flags_],
  }


def _median_of(rounds: list[dict]) -> dict:
  """One part's figures over rounds: each number the median of the rounds that have it."""
  if len(rounds) == 1:
    return rounds[0]
  merged = {}
  for r in rounds:
    for key, value in r.items():
      merged.setdefault(key, []).append(value)
  out = {
    key: statistics.median(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    else values[0]
    for key, values in merged.items()
  }
  return {**out, "rounds": rounds}


def _ratios(runs: dict) -> dict:
  """jaxloc's training images/s over each Keras setting's, round by round, and the median."""
  out = {}
  for keras in ("train_keras", "train_keras_onednn"):
    if "train_jaxloc" in runs and keras in runs:
      per_round = [
        j["images_per_s"] / k["images_per_s"]
        for j, k in zip(runs["train_jaxloc"], runs[keras], strict=True)
        if j.get("images_per_s") and k.get("images_per_s")
      ]
      if per_round:
        out[f"jaxloc_vs_{keras}"] = {"rounds": per_round, "median": statistics.median(per_round)}
  return out


def main(argv):
  del argv
  if _PART.value:
    print(json.dumps(_run_part(_PART.value, _STEPS.value)))
    return
  names = _PARTS.value or PARTS
  for name in names:
    if name not in PARTS:
      raise UserError(f"unknown part {name!r}; choose from {', '.join(PARTS)}")
  if _ROUNDS.value < 1:
    raise UserError(f"--rounds={_ROUNDS.value}: give 1 or more")
  print(f"cpu: {json.dumps(cpu())}", file=sys.stderr, flush=True)
  runs = {name: [] for name in names}
  for _ in range(_ROUNDS.value):
    for name in names:  # in turn, round by round
      runs[name].append(_subprocess(name))
      print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
  results = {name: {"skipped": NOT_RUN} for name in PARTS}
  results.update({name: _median_of(r) for name, r in runs.items()})
  results["ratios"] = _ratios(runs)
  results["machine"] = {
    "cpus": os.cpu_count(),
    "cpu": cpu(),
    "python": sys.version.split()[0],
    "steps": _STEPS.value,
    "rounds": _ROUNDS.value,
  }
  print(f"cpu: {json.dumps(results['machine']['cpu'])}")
  print(_report(results))
  if _OUT.value:
    cli.write_json(_OUT.value, results)


if __name__ == "__main__":
  cli.run(main)
