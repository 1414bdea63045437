import functools
import json

import conftest
import jax
import numpy as np
import pytest
from conftest import random_digits, small_config

from experiments.configs import digit
from jaxloc import canvas, losses, train, train_state, workdir
from jaxloc.errors import UserError


def test_loss_falls_when_overfitting_one_batch():
  config = digit.get_config()
  state = train_state.create_train_state(jax.random.key(0), config)
  batch = canvas.sample_batch(jax.random.key(1), *random_digits(), batch_size=8)
  step = jax.jit(train_state.train_step)
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.2 * losses[0], losses


def test_train_step_traces_once():
  config = digit.get_config()
  state = train_state.create_train_state(jax.random.key(0), config)
  traces = []

  def counted(state, batch):
    traces.append(1)
    return train_state.train_step(state, batch)

  step = jax.jit(counted, donate_argnums=0)
  for i in range(3):
    batch = canvas.sample_batch(jax.random.key(i), *random_digits(), batch_size=8)
    state, _ = step(state, batch)
  assert len(traces) == 1


def test_ema_update_follows_the_formula():
  p0, p1, p2 = (jax.numpy.full((3,), v) for v in (1.0, 5.0, -2.0))
  ema = train_state.ema_update(p0, p1, 0.999, jax.numpy.int32(1))  # warm-up: d = 2 / 11
  np.testing.assert_allclose(ema, 2 / 11 * 1.0 + 9 / 11 * 5.0, rtol=1e-6)
  late = train_state.ema_update(ema, p2, 0.999, jax.numpy.int32(100_000))  # d = decay
  np.testing.assert_allclose(late, 0.999 * ema - 0.001 * 2.0, rtol=1e-6)


def test_moving_average_does_not_change_training():
  digits, labels = random_digits()
  sample = functools.partial(canvas.training_batch, batch_size=8, canvas_size=75)
  key, data_key = jax.random.key(0), jax.random.key(1)
  out = {}
  for decay in (0.0, 0.9):
    config = digit.get_config()
    config.ema_decay = decay
    state = train_state.create_train_state(key, config)
    assert (state.ema_params is None) == (decay == 0.0)
    sums = train_state.zero_metrics(
      state, digits, labels, sample_fn=sample, loss_fn=losses.total_loss
    )
    out[decay] = train_state.train_steps(
      state,
      sums,
      digits,
      labels,
      data_key,
      num_steps=4,
      sample_fn=sample,
      loss_fn=losses.total_loss,
      ema_decay=decay,
    )[0]
  same = jax.tree_util.tree_map(np.array_equal, out[0.0].params, out[0.9].params)
  assert all(jax.tree_util.tree_leaves(same))
  moved = jax.tree_util.tree_map(np.array_equal, out[0.9].params, out[0.9].ema_params)
  assert not any(jax.tree_util.tree_leaves(moved))
  assert train_state.exported_params(out[0.9]) is out[0.9].ema_params
  assert train_state.exported_params(out[0.0]) is out[0.0].params


def test_same_seed_same_parameters(mnist_dir, tmp_path):
  a = train.train_and_evaluate(small_config(mnist_dir), str(tmp_path / "a"))
  b = train.train_and_evaluate(small_config(mnist_dir), str(tmp_path / "b"))
  pa = (tmp_path / "a" / workdir.PARAMS).read_bytes()
  pb = (tmp_path / "b" / workdir.PARAMS).read_bytes()
  assert pa == pb
  assert a["accuracy"] == b["accuracy"] and a["mean_iou"] == b["mean_iou"]
  c = train.train_and_evaluate(small_config(mnist_dir, seed=1), str(tmp_path / "c"))
  assert (tmp_path / "c" / workdir.PARAMS).read_bytes() != pa
  assert c["num_val"] == 40


def test_end_to_end_run_writes_every_output(mnist_dir, tmp_path):
  run = tmp_path / "run"
  final = train.train_and_evaluate(small_config(mnist_dir), str(run))
  for name in (
    "config.json",
    "metrics.jsonl",
    "params.msgpack",
    "metrics.json",
    "curves.png",
    "predictions.png",
  ):
    assert (run / name).stat().st_size > 0, name
  on_disk = workdir.read_json(str(run / "metrics.json"))
  assert on_disk == json.loads(json.dumps(final))
  for key in (
    "accuracy",
    "mean_iou",
    "median_iou",
    "iou_at_0_6",
    "num_params",
    "train_images_per_s",
    "wall_s",
  ):
    assert key in on_disk
  assert on_disk["num_params"] == 426_638 and on_disk["steps"] == 6
  records = workdir.read_jsonl(str(run / "metrics.jsonl"))
  evals = [r for r in records if "val/accuracy" in r]
  assert [r["epoch"] for r in evals] == [1, 2]
  assert [r["step"] for r in records if "val/accuracy" not in r] == [
    2,
    3,
    4,
    6,
  ]  # every 2nd step and each epoch end
  assert workdir.read_json(str(run / "config.json"))["batch_size"] == 8
  # With a moving average (the default) the raw weights are scored too, beside it.
  assert {f"val_raw/{k}" for k in on_disk["raw"]} == {k for k in evals[-1] if "val_raw/" in k}
  assert on_disk["raw"]["num_val"] == on_disk["num_val"] == 40
  plain = train.train_and_evaluate(small_config(mnist_dir, ema_decay=0.0), str(tmp_path / "plain"))
  assert "raw" not in plain
  assert plain["accuracy"] == on_disk["raw"]["accuracy"]
  assert plain["mean_iou"] == pytest.approx(on_disk["raw"]["mean_iou"], rel=1e-6)


@pytest.mark.parametrize(
  "field,value,match",
  [
    ("batch_size", 0, "batch_size=0 must be a positive integer"),
    ("epochs", -1, "epochs=-1 must be a positive integer"),
    ("steps_per_epoch", 0, "steps_per_epoch=0 must be a positive integer"),
    ("canvas_size", 20, "smaller than a 28x28 digit"),
    ("learning_rate", 0.0, "learning_rate=0.0 must be positive"),
    ("ema_decay", 1.0, r"ema_decay=1.0 must lie in \[0, 1\)"),
    ("lr_schedule", "linear", "lr_schedule='linear': use 'constant' or 'cosine'"),
    ("warmup_steps", -5, "warmup_steps=-5 must be an integer >= 0"),
  ],
)
def test_bad_config_is_rejected(field, value, match, tmp_path):
  with pytest.raises(UserError, match=match):
    train.train_and_evaluate(small_config("", **{field: value}), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cosine_schedule_warms_up_then_decays_to_zero():
  config = digit.get_config()
  config.update(lr_schedule="cosine", warmup_steps=10, epochs=2, steps_per_epoch=50)
  lr = train_state.learning_rate(config)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(config.learning_rate)
  assert float(lr(55)) == pytest.approx(config.learning_rate / 2, rel=1e-2)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
  assert train_state.learning_rate(digit.get_config()) == 1e-3  # the seed: constant


def test_cosine_run_refuses_more_epochs(mnist_dir, tmp_path):
  """Its schedule is laid out over the epochs: more of them would change the past."""
  config = small_config(mnist_dir, lr_schedule="cosine", warmup_steps=1, epochs=1)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  config.epochs = 2
  with pytest.raises(UserError, match="epochs: 1 -> 2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.epochs = 1
  with pytest.raises(UserError, match="its cosine learning-rate schedule has ended"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
  "override,match",
  [
    ("--config.batch_size=0", "error: config.batch_size=0 must be a positive integer"),
    ("--config.batch_sise=3", "unknown config field 'batch_sise'. Did you mean \"batch_size\""),
    ("--config.batch_size=abc", "invalid literal for int"),
    ("--config=experiments/configs/missing.py", "cannot load --config=experiments/configs/missing"),
    ("--num_processes=2", "--num_processes, --process_id need --distributed"),
    ("--distributed", "could not start the distributed run (ValueError: coordinator_address"),
  ],
)
def test_command_line_flag_errors(override, match, tmp_path):
  config = "--config=experiments/configs/digit.py"
  proc = conftest.run_train_command(config, f"--workdir={tmp_path}/run", override)
  assert proc.returncode == 2, proc.stderr
  assert match in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "module,args,match",
  [
    ("experiments.run_cases", ["--cases=multi,nope"], "unknown cases ['nope']; choose from"),
    ("experiments.run_cases", ["--set=dense.no_such=1"], "expected field=value with an existing"),
    ("experiments.run_cases", ["--set=batch_size"], "expected field=value with an existing"),
    ("experiments.run_cases", ["--set=dense.context_features=7"], "Could not override field"),
    ("experiments.benchmark", ["--parts=nope"], "unknown part 'nope'; choose from"),
  ],
)
def test_experiment_script_errors(module, args, match, tmp_path):
  root = [f"--root={tmp_path}/cases"] if module == "experiments.run_cases" else []
  proc = conftest.run_command(module, *root, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert match in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "cases").exists()
