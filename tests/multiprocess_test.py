"""Two real processes on localhost (jax.distributed, CPU collectives over Gloo) train the
same model as one process: the multi-host path of `experiments.train --distributed`."""

import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT
from flax import serialization

from jaxloc import workdir


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(work_dir, mnist_dir, *extra):
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/smoke.py"]
  cmd += [f"--workdir={work_dir}", f"--config.mnist_dir={mnist_dir}", "--config.epochs=1"]
  return subprocess.Popen([*cmd, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc) -> str:
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-3000:]
  return out.decode()


def test_two_processes_train_as_one(tmp_path, mnist_dir):
  port = _free_port()
  flags = ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [_train(tmp_path / "two", mnist_dir, *flags, f"--process_id={i}") for i in (0, 1)]
  single = _train(tmp_path / "one", mnist_dir)
  out0, _, _ = (_finish(p) for p in (*procs, single))
  assert "backend cpu: 2 devices (cpu), 2 processes" in out0

  def run(name):
    path = tmp_path / name
    params = serialization.msgpack_restore((path / workdir.PARAMS).read_bytes())
    records = workdir.read_jsonl(str(path / workdir.METRICS_LOG))
    return params, records, workdir.read_json(str(path / workdir.METRICS))

  params2, records2, final2 = run("two")
  params1, records1, final1 = run("one")
  assert final2["devices"] == 2 and final1["devices"] == 1
  assert [r["step"] for r in records2] == [r["step"] for r in records1]
  for r2, r1 in zip(records2, records1, strict=True):
    assert r2["train/loss"] == pytest.approx(r1["train/loss"], rel=1e-5)
  assert final2["accuracy"] == final1["accuracy"]
  assert final2["mean_iou"] == pytest.approx(final1["mean_iou"], rel=1e-4)
  leaves = zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params1), strict=True)
  for a, b in leaves:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Only process 0 wrote the workdir; process 1's outputs went to a throwaway directory.
  assert (tmp_path / "two" / "tensorboard").is_dir()
