"""Every GPU figure the README and docs/speed.md ask for, in one command:

    python -m experiments.gpu_figures --out=DIR [--tiny] [--budget_s=480]

Measures, most important first, and rewrites DIR/gpu_figures.json after each part (a run
cut short keeps what it finished), with the backend, device kind, jax version and command:

  benchmark_fresh  mnist_detection.py at the course's budget (10,000 steps of batch 32, fresh
                   scenes), scored on 1,000 scenes of the MNIST test digits
  benchmark_fixed  the same network trained on 10,000 exported training images and scored
                   on the 1,000 exported test images (the course's protocol: a fixed set)
  one_run          the seed protocol's whole wall with an empty compilation cache, then
                   with it filled (two processes of experiments.train), and its parts
  replicas         16 members of the seed protocol in one program, against one_run
  conv_impl        the seed model's training images/s with Conv3x3 as the matrix product
                   and as lax.conv_general_dilated

Each part has a time estimate; one that no longer fits in --budget_s is skipped, and the
JSON says so. DIR/gpu_figures.md renders the figures as tables beside the published ones.
--tiny runs every part at toy sizes (under a minute on a 2-core CPU), drawing no canvases:
the same code and figures.
Runs go to DIR/runs/<part>; MNIST from $JAXLOC_MNIST_DIR (or --mnist_dir), else TFDS.
"""

import json
import os
import subprocess
import sys
import time

from absl import flags

from experiments import cli, coco_eval
from jaxloc.errors import UserError

_OUT = flags.DEFINE_string("out", None, "A new or empty folder for the figures and runs.")
_TINY = flags.DEFINE_bool("tiny", False, "Every part at toy sizes (for a CPU).")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "Skip the parts that would end after this.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "IDX directory (default: $JAXLOC_MNIST_DIR).")
flags.mark_flags_as_required(["out"])

# Published figures of SSD from scratch on this data (TDT4265 assignment 4 reports).
PUBLISHED = {"best AP50": 0.869, "full COCO line": {"AP": 0.625, "AP50": 0.858, "AP75": 0.770}}
DETECTION_KEYS = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "count_accuracy")
DETECTION_KEYS += ("class_accuracy", "train_images_per_s", "wall_s")

# Per part: (estimated seconds on one H100 / H200, at --tiny on a 2-core CPU) and sizes.
FULL = {
  "estimate_s": dict(
    benchmark_fresh=90, benchmark_fixed=170, one_run=75, replicas=120, conv_impl=40
  ),
  "detection": dict(steps=10_000, batch_size=32, num_val=1000, num_train=10_000),
  "seed_config": "experiments/configs/digit.py",
  "seed_args": (),  # overrides of seed_config
  "members": 16,
  "conv_steps": 2000,
}
TINY = {
  "estimate_s": dict(benchmark_fresh=40, benchmark_fixed=45, one_run=40, replicas=20, conv_impl=20),
  "detection": dict(steps=4, batch_size=4, num_val=8, num_train=16, canvas_size=64),
  "seed_config": "experiments/configs/smoke.py",
  "seed_args": ("--config.epochs=1", "--config.num_plot=0"),  # toy runs draw no canvases
  "members": 2,
  "conv_steps": 5,
}


def _detection_spec(sizes: dict, **data):
  """mnist_detection.py at `sizes` (steps, batch), `data` fields added (a stored set)."""
  from experiments.configs import mnist_detection
  from jaxloc import configs

  config = mnist_detection.get_config()
  config.mnist_dir = _MNIST_DIR.value or ""
  config.batch_size = sizes["batch_size"]
  config.epochs, config.steps_per_epoch = 4, sizes["steps"] // 4  # a learning curve of 4 points
  config.num_val = sizes["num_val"]
  if "canvas_size" in sizes:  # toy scenes: digits that fit a small canvas
    config.canvas_size = sizes["canvas_size"]
    config.scene.size_range = (12, 24)
    config.scene.max_objects = 5
    config.scene.count_probs = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
    config.eval_batch_size = sizes["num_val"]
    config.num_plot = 0
  config.data.update(data)
  return configs.read(config)


def _detection_figures(spec, run_dir: str) -> dict:
  """Trains `spec` into `run_dir`; its figures, AP_small / AP_medium from its COCO files."""
  from jaxloc import train, workdir

  final = train.train_and_evaluate(spec, run_dir, echo=lambda line: print(line, flush=True))
  out = {k: final.get(k) for k in DETECTION_KEYS}
  out.update(_coco_areas(run_dir))
  curve = [
    r for r in workdir.read_jsonl(os.path.join(run_dir, workdir.METRICS_LOG)) if "val/AP50" in r
  ]
  out["curve"] = [
    {"step": r["step"], **{k: r[f"val/{k}"] for k in ("AP", "AP50", "count_accuracy")}}
    for r in curve
  ]
  return out


def _coco_areas(run_dir: str) -> dict:
  """AP over COCO's small and medium digits (pycocotools on the run's COCO files)."""
  from jaxloc import workdir

  read = lambda name: workdir.read_json(os.path.join(run_dir, name))
  figures = coco_eval.stats(read("ground_truth.json"), read("detections.json"))
  area = lambda ap: ap if ap >= 0 else None  # -1: no digit of that size
  return {"AP_small": area(figures["AP_small"]), "AP_medium": area(figures["AP_medium"])}


def benchmark_fresh(sizes, run_dir, figures):
  return _detection_figures(_detection_spec(sizes["detection"]), run_dir)


def benchmark_fixed(sizes, run_dir, figures):
  from jaxloc import datasets, loaders

  d = sizes["detection"]
  spec = _detection_spec(d)
  paths = {}
  t = time.perf_counter()
  for split, num in (("train", d["num_train"]), ("test", d["num_val"])):
    paths[split] = os.path.join(run_dir + "-data", split)
    datasets.write(paths[split], loaders.export_scenes(spec, num, split, spec.data.val_seed))
  export_s = time.perf_counter() - t
  spec = _detection_spec(d, train_path=paths["train"], val_path=paths["test"])
  return {**_detection_figures(spec, run_dir), "export_s": export_s}


def _train_process(run_dir: str, config: str, cache: str, *extra: str) -> dict:
  """One experiments.train process: its wall (process start to exit) and its final figures
  (metrics.json; summary.json for a replica run)."""
  from jaxloc import train, workdir

  cmd = [sys.executable, "-m", "experiments.train", f"--config={config}", f"--workdir={run_dir}"]
  cmd += [f"--compilation_cache={cache}", *extra]
  if _MNIST_DIR.value:
    cmd.append(f"--config.mnist_dir={_MNIST_DIR.value}")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  t = time.perf_counter()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
  summary = os.path.join(run_dir, train.SUMMARY)
  final = summary if os.path.exists(summary) else os.path.join(run_dir, workdir.METRICS)
  return {"process_wall_s": wall, **workdir.read_json(final)}


def _cache(run_dir: str) -> str:
  """The compilation cache of the parts' processes (DIR/runs/xla-cache): empty when one_run
  starts, so its first run is cold; replicas then reuses what it holds."""
  return os.path.join(os.path.dirname(run_dir), "xla-cache")


def one_run(sizes, run_dir, figures):
  cache = _cache(run_dir)
  parts = ("wall_s", "train_s", "compile_s", "eval_s", "save_s", "train_images_per_s")
  out = {}
  for name in ("cold", "warm"):
    final = _train_process(
      os.path.join(run_dir, name), sizes["seed_config"], cache, *sizes["seed_args"]
    )
    out[f"{name}_wall_s"] = final["process_wall_s"]
    out[f"{name}_done"] = {k: final[k] for k in parts}
  return out


def replicas(sizes, run_dir, figures):
  members = sizes["members"]
  final = _train_process(
    run_dir,
    sizes["seed_config"],
    _cache(run_dir),
    *sizes["seed_args"],
    f"--config.replicas={members}",
  )
  one = figures.get("one_run", {}).get("warm_wall_s")
  return {
    "members": members,
    "wall_s": final["process_wall_s"],
    "one_run_wall_s": one,
    "wall_vs_one_run": final["process_wall_s"] / one if one else None,
    "images_per_s": final.get("images_per_s"),
    "replica_mode": final.get("replica_mode"),
  }


def conv_impl(sizes, run_dir, figures):
  import jax

  from experiments import bench_seed
  from experiments.configs import digit, smoke
  from jaxloc import conv

  config = (smoke if _TINY.value else digit).get_config()
  config.mnist_dir = _MNIST_DIR.value or ""
  backend = jax.default_backend()
  chosen = conv.CONV_IMPL.get(backend, "matmul")
  out = {"chosen_for_backend": chosen}
  try:
    for impl in conv.CONV_IMPLS:
      conv.CONV_IMPL[backend] = impl
      r = bench_seed.train_jaxloc(sizes["conv_steps"], steps_per_call=1, config=config)
      out[f"{impl}_images_per_s"] = r["images_per_s"]
  finally:
    conv.CONV_IMPL[backend] = chosen
  return out


# Each part: (sizes, its run folder, the figures so far) -> its figures.
MEASURE = dict(
  benchmark_fresh=benchmark_fresh,
  benchmark_fixed=benchmark_fixed,
  one_run=one_run,
  replicas=replicas,
  conv_impl=conv_impl,
)
PARTS = tuple(MEASURE)  # in this order: the most important first


def _machine() -> dict:
  import jax

  return {
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "command": " ".join(sys.argv),
  }


def render(figures: dict) -> str:
  """gpu_figures.md: the figures as the README's tables."""
  m = figures["machine"]
  lines = [f"# GPU figures: {m['device_kind']} ({m['backend']}), jax {m['jax']}", ""]
  lines += [f"`{m['command']}`", ""]
  columns = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "count acc", "class acc")
  lines += ["| MNIST detection benchmark | " + " | ".join(columns) + " | training images/s |"]
  lines += ["| --- " * 9 + "|"]
  cell = lambda v: "" if v is None else (f"{v:,.3f}" if isinstance(v, float) else str(v))
  for part, label in (
    ("benchmark_fresh", "fresh scenes"),
    ("benchmark_fixed", "a fixed training set"),
  ):
    r = figures["parts"].get(part, {})
    if "skipped" in r or "error" in r:
      lines.append(f"| {label} | {r.get('skipped') or r.get('error')} | | | | | | | |")
      continue
    keys = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "count_accuracy", "class_accuracy")
    lines.append(
      f"| {label} | "
      + " | ".join(cell(r.get(k)) for k in keys)
      + f" | {cell(r.get('train_images_per_s'))} |"
    )
  full = PUBLISHED["full COCO line"]
  best = PUBLISHED["best AP50"]
  lines.append(
    f"| SSD from scratch, published | {full['AP']} | {full['AP50']} (best {best}) | "
    f"{full['AP75']} | | | | | |"
  )
  lines += ["", "| part | figures |", "| --- | --- |"]
  for part in ("one_run", "replicas", "conv_impl"):
    r = figures["parts"].get(part, {})
    flat = {k: v for k, v in r.items() if not isinstance(v, dict)}
    lines.append(f"| {part} | " + ", ".join(f"{k} {cell(v)}" for k, v in flat.items()) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = _OUT.value
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f"--out={out} exists and is not empty; give a new folder")
  if _BUDGET.value <= 0:
    raise UserError(f"--budget_s={_BUDGET.value}: give a positive number of seconds")
  os.makedirs(out, exist_ok=True)
  from jaxloc import workdir

  sizes = TINY if _TINY.value else FULL
  figures = {"machine": _machine(), "tiny": _TINY.value, "budget_s": _BUDGET.value, "parts": {}}
  start = time.perf_counter()
  for part in PARTS:
    elapsed, estimate = time.perf_counter() - start, sizes["estimate_s"][part]
    if elapsed + estimate > _BUDGET.value:
      figures["parts"][part] = {
        "skipped": f"needs about {estimate} s; {_BUDGET.value - elapsed:.0f} s of the budget left"
      }
    else:
      t = time.perf_counter()
      run_dir = os.path.join(out, "runs", part)
      try:
        measured = MEASURE[part](sizes, run_dir, figures["parts"])
        figures["parts"][part] = {**measured, "part_s": time.perf_counter() - t}
      except Exception as e:  # one part failing keeps the others' figures
        figures["parts"][part] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(f"{part}: {json.dumps(figures['parts'][part])}", flush=True)
    figures["wall_s"] = time.perf_counter() - start
    workdir.write_json(os.path.join(out, "gpu_figures.json"), figures)
    with open(os.path.join(out, "gpu_figures.md"), "w") as f:
      f.write(render(figures))
  print(f"wrote {out}/gpu_figures.json and gpu_figures.md in {figures['wall_s']:.0f} s")


if __name__ == "__main__":
  cli.run(main)
