"""Exact resume after SIGKILL, torn logs, config changes, locks, divergence."""

import os

import pytest
from conftest import (
  kill_after_first_checkpoint,
  resume_config,
  strip,
  train_cli,
  train_run,
)

from jaxloc import train, workdir
from jaxloc.errors import UserError


def test_sigkill_then_resume_equals_uninterrupted_run(mnist_dir, tmp_path, resume_run):
  config = resume_config(mnist_dir)
  ref_dir, reference = resume_run

  run = tmp_path / "killed"
  kill_after_first_checkpoint(train_cli(config, run), run)
  assert not (run / "metrics.json").exists()

  resumed = train_run(config, str(run))
  assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] < 12
  assert (run / workdir.PARAMS).read_bytes() == (ref_dir / workdir.PARAMS).read_bytes()
  assert strip(resumed) == strip(reference)
  steps = [
    r["step"] for r in workdir.read_jsonl(str(run / workdir.METRICS_LOG)) if "val/accuracy" not in r
  ]
  assert steps == sorted(set(steps)), "a step was logged twice"


def test_torn_log_line_is_dropped_on_resume(mnist_dir, one_epoch_run):
  run = one_epoch_run[0]
  config = resume_config(mnist_dir, epochs=1)
  os.remove(run / workdir.METRICS)
  with open(run / workdir.METRICS_LOG, "a") as f:
    f.write('{"step": 99, "train/lo')  # a write cut off by a kill
  config.epochs = 2  # train on from the final checkpoint
  final = train_run(config, str(run))
  assert final["resumed_from_step"] == 6 and final["steps"] == 12
  records = workdir.read_jsonl(str(run / workdir.METRICS_LOG))
  assert [r["epoch"] for r in records if "val/accuracy" in r] == [1, 2]
  assert all(r["step"] <= 12 for r in records)


def test_changed_config_is_refused_with_the_fields(mnist_dir, tmp_path, one_epoch_run):
  run = one_epoch_run[0]
  before = (run / workdir.PARAMS).read_bytes()
  changed = resume_config(mnist_dir, epochs=1, learning_rate=0.01, batch_size=4)
  with pytest.raises(UserError, match=r"(?s)batch_size: 8 -> 4.*learning_rate: 0.001 -> 0.01"):
    train_run(changed, str(run))
  assert (run / workdir.PARAMS).read_bytes() == before
  with pytest.raises(UserError, match="finished run of 6 steps"):
    train_run(resume_config(mnist_dir, epochs=1), str(run))

  train_run(changed, str(run), fresh=True)
  backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(backups) == 1 and (backups[0] / workdir.PARAMS).read_bytes() == before
  assert workdir.read_json(str(run / workdir.CONFIG))["batch_size"] == 4


def test_second_run_on_a_locked_workdir_refuses(mnist_dir, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  with workdir.lock(str(run)):
    with pytest.raises(UserError, match="in use by a running job"):
      train_run(resume_config(mnist_dir, epochs=1), str(run))


def test_stale_lock_of_a_killed_run_does_not_block(mnist_dir, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / ".lock").write_text("pid 999999 on a-killed-host")  # file left, no flock held
  final = train_run(resume_config(mnist_dir, epochs=1), str(run))
  assert final["steps"] == 6


def test_non_finite_loss_stops_with_the_step(mnist_dir, tmp_path):
  run = tmp_path / "run"
  config = resume_config(mnist_dir, epochs=1, learning_rate=1e30)
  with pytest.raises(train.TrainingDiverged, match=r"steps \d+\.\.\d+.*last good checkpoint"):
    train_run(config, str(run))
  assert not (run / workdir.METRICS).exists()
