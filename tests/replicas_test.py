"""Replicas (`config.replicas` = N): N members in one compiled program, each equal to a run
of its own with seed `seed + i`, each a normal workdir; a summary over them; exact resume."""

import json

import jax
import numpy as np
import pytest
from conftest import kill_after_first_checkpoint, run_train_command, small_config
from flax import serialization
from resume_test import TIMING, _cli, _config, _strip
from scene_test import _case_config

from jaxloc import inference, train, workdir
from jaxloc.errors import UserError


def _params(run_dir):
  return serialization.msgpack_restore((run_dir / workdir.PARAMS).read_bytes())


def _assert_close(a, b):
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  for x, y in leaves:
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_each_member_equals_its_own_run(mnist_dir, tmp_path, mode):
  config = small_config(mnist_dir, seed=3, replicas=2, replica_mode=mode, num_val=32)
  summary = train.train_and_evaluate(config, str(tmp_path / "replicas"))
  assert summary["members"] == 2 and summary["replica_mode"] == mode
  finals = []
  for i in range(2):
    single = small_config(mnist_dir, seed=3 + i, num_val=32)
    own = train.train_and_evaluate(single, str(tmp_path / f"seed{3 + i}"))
    member_dir = tmp_path / "replicas" / f"member-{i}"
    final = workdir.read_json(str(member_dir / workdir.METRICS))
    assert final["accuracy"] == own["accuracy"]
    assert final["mean_iou"] == pytest.approx(own["mean_iou"], rel=1e-4)
    _assert_close(_params(member_dir), _params(tmp_path / f"seed{3 + i}"))
    assert workdir.read_json(str(member_dir / workdir.CONFIG))["seed"] == 3 + i
    finals.append(final)
    # a member's workdir is a workdir: the inference API reads it unchanged
    predict = inference.Predictor.from_workdir(str(member_dir))
    assert predict(np.zeros((1, 75, 75), np.uint8))["label"].shape == (1,)
  on_disk = workdir.read_json(str(tmp_path / "replicas" / train.SUMMARY))
  iou = [f["mean_iou"] for f in finals]
  assert on_disk["figures"]["mean_iou"] == pytest.approx(
    dict(mean=np.mean(iou), std=np.std(iou), min=min(iou), max=max(iou))
  )
  assert on_disk == json.loads(json.dumps(summary))


def test_replicas_resume_exactly_after_sigkill(mnist_dir, tmp_path):
  config = _config(mnist_dir, replicas=2)
  reference = train.train_and_evaluate(config, str(tmp_path / "ref"))
  run = tmp_path / "killed"
  kill_after_first_checkpoint(_cli(config, run), run / "member-1")
  resumed = train.train_and_evaluate(config, str(run))
  for i in range(2):
    a, b = run / f"member-{i}", tmp_path / "ref" / f"member-{i}"
    assert (a / workdir.PARAMS).read_bytes() == (b / workdir.PARAMS).read_bytes()
    assert _strip(workdir.read_json(str(a / workdir.METRICS))) == _strip(
      workdir.read_json(str(b / workdir.METRICS))
    )
  figures = {k: v for k, v in resumed["figures"].items() if k not in TIMING}
  assert figures == {k: v for k, v in reference["figures"].items() if k not in TIMING}
  with pytest.raises(UserError, match="finished run"):
    train.train_and_evaluate(config, str(run))


@pytest.mark.parametrize(
  "override, match",
  [
    ("--config.replicas=0", "config.replicas=0 must be a positive integer"),
    ("--config.replica_mode=pmap", "config.replica_mode='pmap': use 'auto', 'vmap' or 'map'"),
  ],
)
def test_bad_replica_settings_are_one_error_line(tmp_path, override, match):
  proc = run_train_command(
    "--config=experiments/configs/smoke.py", f"--workdir={tmp_path / 'run'}", override
  )
  assert proc.returncode == 2 and proc.stderr.strip() == f"error: {match}", proc.stderr
  assert not (tmp_path / "run").exists()


def test_scene_members_are_scored_as_their_own_runs(mnist_dir, tmp_path):
  """The dense detector's members, scored in one call per chunk, get their own runs' AP."""
  config = _case_config(mnist_dir, "multi")
  config.update(dict(seed=5, replicas=2))
  summary = train.train_and_evaluate(config, str(tmp_path / "replicas"))
  aps = []
  for i in range(2):
    single = _case_config(mnist_dir, "multi")
    single.seed = 5 + i
    own = train.train_and_evaluate(single, str(tmp_path / f"seed{i}"))
    final = workdir.read_json(str(tmp_path / "replicas" / f"member-{i}" / workdir.METRICS))
    for key in ("AP", "AP50", "count_accuracy", "heatmap_loss"):
      assert final[key] == pytest.approx(own[key], rel=1e-3, abs=1e-4), key
    aps.append(final["AP"])
  assert summary["figures"]["AP"]["mean"] == pytest.approx(np.mean(aps))
