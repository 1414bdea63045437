"""The train state and step: learning, one trace, the moving average, the schedule, and the
stacking of replica members."""

import functools

import jax
import numpy as np
import pytest
from conftest import random_digits

from experiments.configs import digit
from jaxloc import canvas, configs, parallel, tasks, train_state


def _step_fn(config):
  """train_step(state, batch) of the config: its loss, optimizer and hyperparameters."""
  spec = configs.read(config)
  return functools.partial(
    train_state.train_step,
    hp=train_state.step_hyperparameters(spec),
    loss_fn=tasks.build(spec).loss_fn,
    optimizer_fn=train_state.optimizer_fn(spec.opt),
  )


def test_loss_falls_when_overfitting_one_batch():
  config = digit.get_config()
  state = train_state.create_train_state(jax.random.key(0), configs.read(config))
  batch = canvas.training_batch(jax.random.key(1), 0, *random_digits(), batch_size=8)
  step = jax.jit(_step_fn(config))
  losses = []
  for _ in range(40):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.2 * losses[0], losses


def test_train_step_traces_once():
  config = digit.get_config()
  state = train_state.create_train_state(jax.random.key(0), configs.read(config))
  traces, step_fn = [], _step_fn(config)

  def counted(state, batch):
    traces.append(1)
    return step_fn(state, batch)

  step = jax.jit(counted, donate_argnums=0)
  for i in range(3):
    batch = canvas.training_batch(jax.random.key(i), 0, *random_digits(), batch_size=8)
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
    spec = configs.read(config)
    state = train_state.create_train_state(key, spec)
    assert (state.ema_params is None) == (decay == 0.0)
    loss_fn = tasks.build(spec).loss_fn
    sums = train_state.zero_metrics(state, digits, labels, sample_fn=sample, loss_fn=loss_fn)
    out[decay] = train_state.train_steps(
      state,
      sums,
      digits,
      labels,
      data_key,
      train_state.step_hyperparameters(spec),
      num_steps=4,
      sample_fn=sample,
      loss_fn=loss_fn,
      optimizer_fn=train_state.optimizer_fn(spec.opt),
    )[0]
  same = jax.tree_util.tree_map(np.array_equal, out[0.0].params, out[0.9].params)
  assert all(jax.tree_util.tree_leaves(same))
  moved = jax.tree_util.tree_map(np.array_equal, out[0.9].params, out[0.9].ema_params)
  assert not any(jax.tree_util.tree_leaves(moved))
  assert train_state.exported_params(out[0.9]) is out[0.9].ema_params
  assert train_state.exported_params(out[0.0]) is out[0.0].params


def test_cosine_schedule_warms_up_then_decays_to_zero():
  config = digit.get_config()
  config.update(lr_schedule="cosine", warmup_steps=10, epochs=2, steps_per_epoch=50)
  lr = train_state.learning_rate(configs.read(config).opt)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(config.learning_rate)
  assert float(lr(55)) == pytest.approx(config.learning_rate / 2, rel=1e-2)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
  assert (
    train_state.learning_rate(configs.read(digit.get_config()).opt) == 1e-3
  )  # the seed: constant


def test_stack_and_member_are_inverse():
  config = digit.get_config()
  states = [
    train_state.create_train_state(jax.random.key(i), configs.read(config)) for i in range(3)
  ]
  stacked = parallel.stack(states)
  assert stacked.params["Dense_0"]["kernel"].shape == (3, 3136, 128)
  for i, state in enumerate(states):
    leaves = jax.tree_util.tree_leaves(parallel.member(stacked, i))
    assert all(map(np.array_equal, leaves, jax.tree_util.tree_leaves(state)))
  host = {"n": np.arange(6).reshape(3, 2), "x": stacked.step}  # numpy leaves stay numpy
  taken = parallel.member(host, 2)
  assert isinstance(taken["n"], np.ndarray) and list(taken["n"]) == [4, 5]
  assert isinstance(taken["x"], jax.Array) and int(taken["x"]) == int(states[2].step)
