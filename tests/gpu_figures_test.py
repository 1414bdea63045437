"""experiments.gpu_figures --tiny: every part at toy sizes writes every figure a GPU run would;
a budget that fits nothing skips each part and says so; a used --out is refused."""

import json

from conftest import run_command

# The figures the GPU issue asks for (the module itself is not imported: its flags would
# clash with the other scripts' in one test process).
PARTS = {"benchmark_fresh", "benchmark_fixed", "one_run", "replicas", "conv_impl"}
DETECTION_KEYS = {"AP", "AP50", "AP75", "AP_small", "AP_medium", "count_accuracy"}
DETECTION_KEYS |= {"class_accuracy", "train_images_per_s", "wall_s"}


def test_tiny_run_writes_every_figure_and_the_tables(tmp_path, mnist_dir):
  out = tmp_path / "figures"
  proc = run_command(
    "experiments.gpu_figures", f"--out={out}", "--tiny", f"--mnist_dir={mnist_dir}"
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = json.loads((out / "gpu_figures.json").read_text())
  assert {"backend", "device_kind", "jax", "command"} <= set(figures["machine"])
  parts = figures["parts"]
  assert set(parts) == PARTS
  for part in ("benchmark_fresh", "benchmark_fixed"):
    assert DETECTION_KEYS <= set(parts[part]), parts[part]
    assert [r["step"] for r in parts[part]["curve"]] == [1, 2, 3, 4]  # a point per quarter
  assert parts["one_run"]["cold_wall_s"] > 0 and parts["one_run"]["warm_wall_s"] > 0
  assert set(parts["one_run"]["warm_done"]) >= {"wall_s", "train_s", "compile_s", "eval_s"}
  assert parts["replicas"]["members"] == 2 and parts["replicas"]["replica_mode"] in ("vmap", "map")
  assert parts["replicas"]["one_run_wall_s"] == parts["one_run"]["warm_wall_s"]
  assert (
    parts["conv_impl"]["matmul_images_per_s"] > 0 and parts["conv_impl"]["lax_images_per_s"] > 0
  )
  table = (out / "gpu_figures.md").read_text()
  assert "| fresh scenes |" in table and "SSD from scratch, published | 0.625" in table


def test_a_budget_too_small_skips_every_part_and_a_used_out_is_refused(tmp_path):
  out = tmp_path / "figures"
  proc = run_command("experiments.gpu_figures", f"--out={out}", "--tiny", "--budget_s=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = json.loads((out / "gpu_figures.json").read_text())["parts"]
  assert all(p["skipped"].startswith("needs about ") for p in parts.values()), parts
  again = run_command("experiments.gpu_figures", f"--out={out}", "--tiny")
  assert again.returncode == 2 and f"--out={out} exists and is not empty" in again.stderr
