"""Data parallelism: 8 simulated CPU devices give the losses and parameters of 1 device."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import random_digits

from experiments.configs import digit
from jaxloc import configs, parallel, tasks, train_state
from jaxloc.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_EIGHT_DEVICES = r"""
import functools, importlib, sys, jax, numpy as np
from jaxloc import configs, parallel, tasks, train_state
assert jax.device_count() == 8, jax.devices()
rng = np.random.default_rng(0)
digits = jax.numpy.asarray(rng.integers(0, 256, (64, 28, 28)).astype(np.uint8))
labels = jax.numpy.asarray(rng.integers(0, 10, 64), jax.numpy.int32)

def check(name):  # a scene config file of experiments/configs
  config = importlib.import_module("experiments.configs." + name).get_config()
  init_key, data_key = jax.random.split(jax.random.key(0))
  config.batch_size, config.eval_batch_size = 16, 16
  config.canvas_size, config.num_val = 64, 48
  spec = configs.read(config)
  task = tasks.build(spec)
  sample_fn, loss_fn = task.sample_fn, task.loss_fn
  optimizer_fn = train_state.optimizer_fn(spec.opt)

  def run(mesh):
    state = train_state.create_train_state(init_key, spec)
    data = (digits, labels, data_key, train_state.step_hyperparameters(spec))
    if mesh is not None:
      state, data = parallel.replicate((state, data), mesh)
    sums = train_state.zero_metrics(state, digits, labels, sample_fn=sample_fn, loss_fn=loss_fn)
    fn = train_state.compile_train_steps(state, sums, *data, num_steps=3, sample_fn=sample_fn,
                                         loss_fn=loss_fn, optimizer_fn=optimizer_fn, mesh=mesh)
    state, sums = fn(state, sums, *data)
    return state, jax.device_get(sums)

  one, one_sums = run(None)
  mesh = parallel.data_mesh()
  eight, eight_sums = run(mesh)
  leaf = jax.tree_util.tree_leaves(eight.params)[0]
  assert len(leaf.sharding.device_set) == 8, leaf.sharding
  np.testing.assert_allclose(one_sums["loss"], eight_sums["loss"], rtol=1e-5)
  # with BatchNorm: the statistics of the whole batch, not of each device's share
  weights = lambda s: jax.tree_util.tree_leaves((s.params, s.batch_stats))
  for a, b in zip(weights(one), weights(eight), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
  # the evaluation gives the same figures on 8 devices as on 1
  val = {"digits": digits, "labels": labels}
  place = lambda m: val if m is None else parallel.replicate(val, m)
  score = lambda m: task.make_evaluator(one.apply_fn, m)(train_state.raw_variables(one), place(m))
  a, b = score(None)[0], score(mesh)[0]
  for key in ("count_accuracy", "mean_iou", "AP", "AP50"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  print("OK", name, float(one_sums["loss"]), float(eight_sums["loss"]))

for name in sys.argv[1:]:
  check(name)
try:
  parallel.check_divisible(12)
except Exception as e:
  print("ERROR:", e)
"""


def test_eight_devices_match_one_device():
  """The dense detector (`multi`, with BatchNorm: the statistics of the global batch) trained
  and scored in one process of 8 CPU devices. The seed's model on 2 devices against 1 is
  multiprocess_test's (one device in each of two processes)."""
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags)
  proc = subprocess.run(
    [sys.executable, "-c", _EIGHT_DEVICES, "multi"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "OK multi " in proc.stdout, proc.stdout
  assert "ERROR: config.batch_size=12 does not divide by the 8 devices" in proc.stdout


def test_batch_not_divisible_by_devices_is_rejected(monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 4)
  with pytest.raises(UserError, match="batch_size=6 does not divide by the 4 devices"):
    parallel.check_divisible(6)
  config = digit.get_config()
  config.batch_size = 6
  with pytest.raises(UserError, match="batch_size=6 does not divide by the 4 devices"):
    configs.read(config)


def test_steps_per_call_does_not_change_the_result():
  digits, labels = random_digits()
  config = digit.get_config()
  config.batch_size = 8
  spec = configs.read(config)
  task = tasks.build(spec)
  sample_fn, loss_fn = task.sample_fn, task.loss_fn
  init_key, data_key = jax.random.split(jax.random.key(0))
  results = []
  for chunk in (1, 2, 4):
    state = train_state.create_train_state(init_key, spec)
    sums = train_state.zero_metrics(state, digits, labels, sample_fn=sample_fn, loss_fn=loss_fn)
    data = (digits, labels, data_key, train_state.step_hyperparameters(spec))
    fn = train_state.compile_train_steps(
      state,
      sums,
      *data,
      num_steps=chunk,
      sample_fn=sample_fn,
      loss_fn=loss_fn,
      optimizer_fn=train_state.optimizer_fn(spec.opt),
    )
    for _ in range(4 // chunk):
      state, sums = fn(state, sums, *data)
    results.append((state, jax.device_get(sums)))
  ref_state, ref_sums = results[0]
  for state, sums in results[1:]:
    assert int(state.step) == 4
    np.testing.assert_allclose(sums["loss"], ref_sums["loss"], rtol=1e-5)
    for a, b in zip(
      jax.tree_util.tree_leaves(ref_state.params),
      jax.tree_util.tree_leaves(state.params),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
