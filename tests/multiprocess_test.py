"""Two real processes on localhost (jax.distributed, CPU collectives over Gloo) train the
same model as one process: the multi-host path of `experiments.train --distributed`; a
signal to one of them stops both at the same step, and the same command resumes the pair."""

import random
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import (
  ROOT,
  long_config,
  newest_checkpoint,
  stopped_step,
  train_cli,
  wait_for_first_record,
)
from flax import serialization

from jaxloc import workdir


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train(work_dir, mnist_dir, *extra):
  """A process of `long_config`'s run (40 steps, one per call: a signal soon after the first
  record lands in it)."""
  cmd = train_cli(long_config(mnist_dir), work_dir)
  return subprocess.Popen([*cmd, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc) -> str:
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err.decode()[-3000:]
  return out.decode()


def _pair(work_dir, mnist_dir):
  """The two processes of one distributed run."""
  port = _free_port()
  flags = ["--distributed", f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  return [_train(work_dir, mnist_dir, *flags, f"--process_id={i}") for i in (0, 1)]


def _outputs(path):
  params = serialization.msgpack_restore((path / workdir.PARAMS).read_bytes())
  records = workdir.read_jsonl(str(path / workdir.METRICS_LOG))
  return params, records, workdir.read_json(str(path / workdir.METRICS))


def test_two_processes_train_as_one_and_a_signal_to_one_stops_both(tmp_path, mnist_dir, long_run):
  # A signal to process 1 only stops both at one step, with one checkpoint there.
  run, delay = tmp_path / "run", random.uniform(0.0, 0.3)
  stopped = _pair(run, mnist_dir)
  wait_for_first_record(stopped[0], run)
  time.sleep(delay)
  assert stopped[1].poll() is None, f"the run ended before the signal ({delay:.3f} s)"
  stopped[1].send_signal(signal.SIGTERM)
  errs = [p.communicate(timeout=300)[1].decode() for p in stopped]
  assert [p.returncode for p in stopped] == [143, 143], errs[1][-2000:]
  steps = [stopped_step(err, "SIGTERM", 40) for err in errs]
  assert steps[0] == steps[1] == newest_checkpoint(run), f"signal {delay:.3f} s after the first log"

  # The same command resumes the pair.
  resumed = _pair(run, mnist_dir)
  out_resumed = [_finish(p) for p in resumed][0]
  assert f"resuming at step {steps[0]}" in out_resumed
  assert "backend cpu: 2 devices (cpu), 2 processes" in out_resumed

  # Two processes, stopped and resumed, train as one process uninterrupted (`long_run`): the
  # same records (but the two that the stop cut in two), figures and parameters, to float
  # tolerance.
  params2, records2, final2 = _outputs(run)
  params1, records1, final1 = _outputs(long_run[0])
  assert final2["devices"] == 2 and final1["devices"] == 1
  assert final2["resumed_from_step"] == steps[0]
  losses = lambda records: {
    (r["step"], r["steps_averaged"]): r["train/loss"] for r in records if "steps_averaged" in r
  }
  one, two = losses(records1), losses(records2)
  assert len(set(one) & set(two)) >= len(one) - 1, (sorted(one), sorted(two))
  for key in set(one) & set(two):
    assert two[key] == pytest.approx(one[key], rel=1e-5), key
  assert final2["accuracy"] == final1["accuracy"]
  assert final2["mean_iou"] == pytest.approx(final1["mean_iou"], rel=1e-4)
  leaves = zip(jax.tree_util.tree_leaves(params2), jax.tree_util.tree_leaves(params1), strict=True)
  for a, b in leaves:
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Only process 0 wrote the workdir; process 1's outputs went to a throwaway directory.
  assert (run / "tensorboard").is_dir()
