"""What a researcher sees: the console of a short run, TensorBoard events, the install."""

import os
import re
import subprocess
import sys
import tomllib
import types

import pytest
from conftest import ROOT, run_train_command, shared_commands

from jaxloc import console, workdir

# smoke.py with a record every 2 of an epoch's 3 steps: records at log_every and at epoch ends
SMOKE = ("--config=experiments/configs/smoke.py", "--config.log_every=2")
LIBRARY_LOG = re.compile(r"^[IWE]\d{4} ", re.M)  # absl's format: I1123 04:10:37.07 ...


@pytest.fixture(scope="session")
def run(shared_dir, mnist_dir):
  """A 2-epoch smoke run through the command line, then one more epoch with --verbose."""
  common = (*SMOKE, f"--config.mnist_dir={mnist_dir}")
  path, (first, more) = shared_commands(
    shared_dir,
    "console",
    lambda path: run_train_command(*common, f"--workdir={path}"),
    lambda path: run_train_command(*common, f"--workdir={path}", "--config.epochs=3", "--verbose"),
  )
  return path, first, more


def test_console_of_a_run_is_a_few_readable_lines(run):
  path, proc, _ = run
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  # config + backend + model + training, one line per epoch, done + outputs
  assert len(lines) == 8, proc.stdout
  assert lines[0] == f"config experiments/configs/smoke.py -> workdir {path}"
  assert re.match(r"backend cpu: \d+ devices? \(.*\), 1 process$", lines[1])
  assert lines[2] == "model: 426,638 parameters; new run"
  assert lines[3].startswith("training: 2 epochs x 3 steps of batch 8 = 6 steps")
  for epoch, line in zip((1, 2), lines[4:6], strict=True):
    assert re.match(
      rf"epoch {epoch}/2 \| train loss \S+ box_loss \S+ class_loss \S+ \| "
      r"val acc \S+ IoU \S+ \| \S+ img/s, \S+ s$",
      line,
    ), line
  assert lines[6].startswith("done: 6 steps in ") and f"outputs in {path}" in lines[7]
  assert "params.msgpack, predictions.png, curves.png" in lines[7]
  final = workdir.read_json(str(path / workdir.METRICS))
  assert "params.msgpack, curves.png" in console.end_lines(str(path), final, drawn=False)[1]
  assert lines[7].endswith(f"(tensorboard --logdir {path.parent})")  # the path as given
  assert proc.stderr == ""  # no library INFO logs, no progress bar off a terminal


def test_verbose_shows_library_logs(run):
  _, quiet, verbose = run
  assert verbose.returncode == 0, verbose.stderr
  assert "model: 426,638 parameters; resuming at step 6" in verbose.stdout
  assert "epoch 3/3 | " in verbose.stdout
  assert LIBRARY_LOG.search(verbose.stderr) and "checkpoint" in verbose.stderr
  assert not LIBRARY_LOG.search(quiet.stderr + quiet.stdout)


def test_tensorboard_events_hold_the_logged_figures(run, monkeypatch):
  # TensorBoard's reader without TensorFlow (its own stub, as a TensorBoard installed alone
  # reads): TensorFlow, here for TFDS, would cost this process about 4 s of CPU to import.
  monkeypatch.setitem(sys.modules, "tensorboard.compat.notf", types.ModuleType("notf"))
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  path, _, _ = run
  events = event_accumulator.EventAccumulator(
    str(path / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0}
  )
  events.Reload()
  records = workdir.read_jsonl(str(path / workdir.METRICS_LOG))
  for tag in ("train/loss", "train/box_loss", "val/accuracy", "val/mean_iou", "val_raw/accuracy"):
    logged = sorted((r["step"], r[tag]) for r in records if tag in r)
    read = sorted((e.step, e.value) for e in events.Scalars(tag))
    assert [s for s, _ in read] == [s for s, _ in logged], tag
    assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6), tag
  # a record every 2nd step (SMOKE's log_every) and at each epoch's end, resumed too
  assert [r["step"] for r in records if "steps_averaged" in r] == [2, 3, 4, 6, 8, 9]
  images = events.Images("predictions")
  assert [e.step for e in images] == [3, 6, 9]  # after every evaluation, the resumed one too
  assert images[-1].width > 100 and images[-1].encoded_image_string.startswith(b"\x89PNG")


def _make_install(tmp_path, nvidia_smi_status: int) -> str:
  """The install command `make test` would run, with an nvidia-smi exiting with the status."""
  bin_dir = tmp_path / f"bin{nvidia_smi_status}"
  bin_dir.mkdir()
  (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\nexit {nvidia_smi_status}\n")
  (bin_dir / "nvidia-smi").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
  cmd = ["make", "-n", "-B", "test"]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
  return next(line for line in out.splitlines() if "pip install -q -e" in line)


def test_make_installs_the_cuda_extra_where_nvidia_smi_works(tmp_path):
  assert _make_install(tmp_path, 0).endswith("-e '.[tfds,dev,cuda]'")
  assert _make_install(tmp_path, 9).endswith("-e '.[tfds,dev]'")


def test_accelerator_extras_are_declared():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
  assert any(r.startswith("jax[cuda12]") for r in extras["cuda"])
  assert any(r.startswith("jax[tpu]") for r in extras["tpu"])
