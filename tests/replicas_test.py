"""Replicas (`config.replicas` = N): N members in one compiled program, each equal to a run
of its own with seed `seed + i` (and its values of `config.vary`), each a normal workdir; a
summary over them. Their exact resume after SIGKILL is batch_norm_test's (members with
BatchNorm statistics)."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import (
  case_config,
  shared_run,
  small_config,
  train_run,
)
from flax import serialization

from jaxloc import configs, inference, spec, train, workdir


def _params(run_dir):
  return serialization.msgpack_restore((run_dir / workdir.PARAMS).read_bytes())


def _assert_close(a, b):
  leaves = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
  for x, y in leaves:
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def own_runs(smoke_run, seed1_run):
  """Single runs of seeds 0 and 1: what replica members 0 and 1 of seed 0 must equal."""
  return [smoke_run, seed1_run]


LISTED = dict(learning_rate=3e-3, ema_decay=0.9, box_loss_weight=5.0)  # member 1 of the sweep


@pytest.fixture(scope="module")
def listed_own(mnist_dir, shared_dir):
  """The single run that member 1 of the listed-values sweep must equal."""
  return shared_run(shared_dir, "listed-own", small_config(mnist_dir, seed=1, num_val=32, **LISTED))


def test_each_member_equals_its_own_run(mnist_dir, tmp_path, own_runs):
  """vmap: the members' steps batched into one (the other mode, lax.map, is the next test's;
  vmap with listed values, the dense test's)."""
  config = small_config(mnist_dir, replicas=2, replica_mode="vmap")
  summary = train_run(config, str(tmp_path / "replicas"))
  assert summary["members"] == 2 and summary["replica_mode"] == "vmap"
  finals = []
  for i in range(2):
    own_dir, own = own_runs[i]
    member_dir = tmp_path / "replicas" / f"member-{i}"
    final = workdir.read_json(str(member_dir / workdir.METRICS))
    assert final["accuracy"] == own["accuracy"]
    assert final["mean_iou"] == pytest.approx(own["mean_iou"], rel=1e-4)
    _assert_close(_params(member_dir), _params(own_dir))
    assert workdir.read_json(str(member_dir / workdir.CONFIG))["seed"] == i
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


def test_members_with_listed_values_equal_their_own_runs(mnist_dir, tmp_path, listed_own):
  """Step size, moving average and loss weight enter the one program as each member's own;
  lax.map loops over the members."""
  vary = "learning_rate=1e-3,3e-3 ema_decay=0.99,0.9;box_loss_weight=1,5"
  config = small_config(mnist_dir, replicas=2, replica_mode="map", num_val=32, vary=vary)
  lines = []
  summary = train_run(config, str(tmp_path / "sweep"), echo=lines.append)
  assert summary["replica_mode"] == "map"
  assert summary["varied"] == {
    "learning_rate": [1e-3, 3e-3],
    "ema_decay": [0.99, 0.9],
    "box_loss_weight": [1.0, 5.0],
  }
  assert any("varying " + vary in line for line in lines)
  assert any(
    line.startswith("member 1 (learning_rate 0.003, ema_decay 0.9, box_loss_weight 5)")
    for line in lines
  ), lines
  own_dir, own = listed_own
  member = tmp_path / "sweep" / "member-1"
  final = workdir.read_json(str(member / workdir.METRICS))
  assert final["accuracy"] == own["accuracy"]
  assert final["mean_iou"] == pytest.approx(own["mean_iou"], rel=1e-4)
  assert final["raw"]["mean_iou"] == pytest.approx(own["raw"]["mean_iou"], rel=1e-4)
  _assert_close(_params(member), _params(own_dir))
  saved = workdir.read_json(str(member / workdir.CONFIG))
  assert {k: saved[k] for k in LISTED} == LISTED and saved["vary"] == "" and saved["seed"] == 1


def test_dense_members_vary_their_values_and_are_scored_as_their_own_runs(mnist_dir, tmp_path):
  """The dense detector's members (vmap): the cosine schedule takes each member's peak, its
  loss each member's weights, and scored in one call per chunk they get their own runs' AP."""
  config = case_config(mnist_dir, "multi")
  vary = "learning_rate=3e-3,1e-3 dense.box_loss_weight=1,2"
  config.update(dict(seed=5, replicas=2, replica_mode="vmap", vary=vary))
  summary = train_run(config, str(tmp_path / "sweep"))
  drawn = {"predictions.png", "heatmap.png"} & set(os.listdir(tmp_path / "sweep" / "member-1"))
  assert not drawn and (tmp_path / "sweep" / "member-1" / "pr.png").exists()  # num_plot 0
  member = spec.members(configs.read(config))[1]  # seed 6 and the second values
  own = train.train_and_evaluate(member, str(tmp_path / "own"))
  finals = [
    workdir.read_json(str(tmp_path / "sweep" / f"member-{i}" / workdir.METRICS)) for i in (0, 1)
  ]
  for key in ("AP", "AP50", "count_accuracy", "heatmap_loss", "box_loss"):
    assert finals[1][key] == pytest.approx(own[key], rel=1e-3, abs=1e-4), key
  _assert_close(_params(tmp_path / "sweep" / "member-1"), _params(tmp_path / "own"))
  assert summary["figures"]["AP"]["mean"] == pytest.approx(np.mean([f["AP"] for f in finals]))
  assert summary["varied"] == {"learning_rate": [3e-3, 1e-3], "dense.box_loss_weight": [1.0, 2.0]}
