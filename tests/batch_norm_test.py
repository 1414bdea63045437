"""BatchNorm in the dense detector (`config.dense.norm = "batch"`): the running statistics
are updated in training, read in evaluation, checkpointed, resumed exactly, exported beside
the parameters and kept per replica member."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import case_config, kill_after_first_checkpoint, shared_run, strip, train_run
from flax import serialization

from jaxloc import (
  checkpoint,
  configs,
  evaluation,
  inference,
  loaders,
  model,
  tasks,
  train_state,
  workdir,
)
from jaxloc.errors import UserError


def _config(mnist_dir, **overrides):
  """`multi` with BatchNorm in seconds: 2 epochs of 4 steps, a checkpoint every 2."""
  config = case_config(mnist_dir, "multi")  # multi.py has BatchNorm
  config.update(dict(epochs=2, steps_per_epoch=4, checkpoint_every=2, log_every=2, **overrides))
  assert config.dense.norm == "batch"
  return config


def _command(config, run) -> list[str]:
  flat = {
    "mnist_dir": config.mnist_dir,
    "epochs": config.epochs,
    "steps_per_epoch": config.steps_per_epoch,
    "batch_size": config.batch_size,
    "num_val": config.num_val,
    "log_every": config.log_every,
    "num_plot": config.num_plot,
    "canvas_size": config.canvas_size,
    "checkpoint_every": config.checkpoint_every,
    "dense.norm": "batch",
    "replicas": config.replicas,
  }
  args = [f"--config.{k}={v}" for k, v in flat.items()]
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/multi.py"] + [
    f"--workdir={run}",
    *args,
  ]


def _stats(run):
  return serialization.msgpack_restore((run / workdir.BATCH_STATS).read_bytes())


@pytest.fixture(scope="module")
def reference(mnist_dir, shared_dir):
  return shared_run(shared_dir, "batch-norm", _config(mnist_dir))


def test_train_mode_updates_the_statistics_and_eval_mode_reads_them():
  net = model.DenseDetector(backbone="fpn", norm="batch", conv_features=(4, 8, 8))
  variables = model.init_variables(jax.random.key(0), net, 64)
  assert set(variables) == {"params", "batch_stats"}
  image = jax.random.uniform(jax.random.key(1), (4, 64, 64, 1))
  train = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
  apply = jax.jit(net.apply)
  out, updated = train(variables, image)
  moved = jax.tree_util.tree_map(
    lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updated["batch_stats"]
  )
  assert all(jax.tree_util.tree_leaves(moved)), moved
  # training normalises by the batch: one canvas alone comes out otherwise than in the batch;
  # evaluation by the running statistics: the same alone and in the batch, and they matter
  alone = train(variables, image[:1])[0]
  assert not np.allclose(alone["heatmap"], out["heatmap"][:1], atol=1e-4)
  after = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
  batch, one = apply(after, image), apply(after, image[:1])
  np.testing.assert_allclose(one["heatmap"], batch["heatmap"][:1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(apply(variables, image)["heatmap"], batch["heatmap"], atol=1e-4)


def test_predictor_answers_as_the_run_scored(reference):
  ref, final = reference
  predictor = inference.Predictor.from_workdir(str(ref))
  assert set(predictor.variables) == {"params", "batch_stats"}
  spec = predictor.spec
  task = tasks.build(spec)
  val = loaders.load(spec)[2]
  scored, per = task.make_evaluator(task.model.apply)(predictor.variables, val)
  for key in ("AP", "AP50", "count_accuracy", "class_accuracy", "heatmap_loss"):
    assert scored[key] == final[key], key
  sample_args = spec.scene.sample_args(spec.data.num_val, spec.data.canvas_size)
  scene = evaluation.sampled_chunk(val, 0, val_seed=spec.data.val_seed, **sample_args)
  out = predictor(np.asarray(scene["image"]))
  np.testing.assert_array_equal(out["count"], per["pred_count"])


def test_replica_members_keep_their_own_statistics_and_resume_exactly_after_sigkill(
  mnist_dir, tmp_path, reference
):
  ref, _ = reference
  config = _config(mnist_dir, replicas=2)
  run, killed = tmp_path / "two", tmp_path / "killed"
  summary = train_run(config, run)
  mine, other = _stats(run / "member-0"), _stats(run / "member-1")
  for a, b, c in zip(
    *(jax.tree_util.tree_leaves(t) for t in (mine, _stats(ref), other)), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)  # member 0 is the seed-0 run
    assert not np.allclose(a, c)

  # SIGKILL after the first checkpoints, then the same config: every member as uninterrupted.
  kill_after_first_checkpoint(_command(config, killed), killed / "member-1")
  resumed = train_run(config, str(killed))
  for i in range(2):
    a, b = killed / f"member-{i}", run / f"member-{i}"
    for name in (workdir.PARAMS, workdir.BATCH_STATS):
      assert (a / name).read_bytes() == (b / name).read_bytes(), (i, name)
    got, want = (workdir.read_json(str(d / workdir.METRICS)) for d in (a, b))
    assert strip(got) == strip(want)
    assert got["resumed_from_step"] is not None and got["resumed_from_step"] < 8, got
  assert strip(resumed["figures"]) == strip(summary["figures"])
  with pytest.raises(UserError, match="finished run"):
    train_run(config, str(killed))
  # each member's last checkpoint holds the statistics it exported
  spec = configs.read(_config(mnist_dir))
  like = train_state.create_train_state(jax.random.key(0), spec)
  manager = checkpoint.manager(str(run / "member-0"), spec.schedule.keep_checkpoints)
  state = checkpoint.restore(manager, like, 8)
  for a, b in zip(
    jax.tree_util.tree_leaves(state.batch_stats), jax.tree_util.tree_leaves(mine), strict=True
  ):
    np.testing.assert_array_equal(a, b)
