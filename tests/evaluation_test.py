"""The evaluators: padded last batches, the fixed scene validation set, several models in one
call, the prediction plots."""

import functools

import jax
import numpy as np
import pytest
from conftest import small_config

from experiments.configs import multi
from jaxloc import configs, evaluation, loaders, parallel, tasks, train_state


def test_evaluation_ignores_padding_of_last_batch(mnist_dir, tmp_path):
  config = small_config(mnist_dir)
  _, _, val = loaders.load(configs.read(config))
  state = train_state.create_train_state(jax.random.key(0), configs.read(config))
  eval_fn = functools.partial(
    evaluation.evaluate, state.apply_fn, train_state.raw_variables(state), val, canvas_size=75
  )
  a, per_a = eval_fn(batch_size=40)
  b, per_b = eval_fn(batch_size=16)  # 16 + 16 + 8 real canvases, 8 padded
  assert a["num_val"] == b["num_val"] == 40 and len(per_b["iou"]) == 40
  for k in a:
    assert a[k] == pytest.approx(b[k], rel=1e-5)


def _scene_config(mnist_dir, **overrides):
  config = multi.get_config()
  config.update(dict(mnist_dir=mnist_dir, canvas_size=64, num_val=30, num_plot=3, **overrides))
  return config


def test_scene_validation_set_is_fixed_and_cut_to_num_val(mnist_dir, monkeypatch):
  monkeypatch.setattr(evaluation, "SCENE_VAL_CHUNK", 16)  # 30 scenes: chunks of 16 + 14 used
  config = _scene_config(mnist_dir)
  task = tasks.build(configs.read(config))
  _, _, val = loaders.load(configs.read(config))
  state = train_state.create_train_state(jax.random.key(0), configs.read(config))
  evaluate = task.make_evaluator(state.apply_fn)
  weights = train_state.raw_variables(state)
  (a, per_a), (b, per_b) = evaluate(weights, val), evaluate(weights, val)
  assert a["num_val"] == 30 and len(per_a["count"]) == 30
  assert a == b
  for key in per_a:
    np.testing.assert_array_equal(per_a[key], per_b[key])
  other = tasks.build(configs.read(_scene_config(mnist_dir, val_seed=1)))
  other = other.make_evaluator(state.apply_fn)
  assert not np.array_equal(other(weights, val)[1]["box"], per_a["box"])
  # the model applied 4 scenes at a time (eval_batch_size): the same scenes and figures
  small = tasks.build(configs.read(_scene_config(mnist_dir, eval_batch_size=4)))
  c, per_c = small.make_evaluator(state.apply_fn)(weights, val)
  assert c == pytest.approx(a, rel=1e-5, abs=1e-6)
  for key in per_a:
    np.testing.assert_allclose(per_c[key], per_a[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("scene", [False, True])
def test_models_scored_in_one_call_get_their_own_figures(mnist_dir, scene):
  """`members`: stacked models (a run's averaged and raw weights, replicas) in one compiled
  call per batch get the figures each gets alone."""
  config = _scene_config(mnist_dir) if scene else small_config(mnist_dir)
  task = tasks.build(configs.read(config))
  _, _, val = loaders.load(configs.read(config))
  models = [
    train_state.raw_variables(
      train_state.create_train_state(jax.random.key(i), configs.read(config))
    )
    for i in (0, 1)
  ]
  together = task.make_evaluator(task.model.apply, None, True)(parallel.stack(models), val)
  assert len(together) == 2
  for params, (summary, per) in zip(models, together, strict=True):
    alone, per_alone = task.make_evaluator(task.model.apply)(params, val)
    assert summary.keys() == alone.keys()
    for k in alone:
      assert summary[k] == pytest.approx(alone[k], rel=1e-5, abs=1e-6), k
    for k in per_alone:
      np.testing.assert_allclose(per[k], per_alone[k], rtol=1e-4, atol=1e-5, err_msg=k)
  assert together[0][0] != together[1][0]  # two models, two sets of figures


@pytest.mark.parametrize("scene", [False, True])
def test_plot_predictions_draws_the_first_validation_canvases(mnist_dir, tmp_path, scene):
  config = _scene_config(mnist_dir) if scene else small_config(mnist_dir, num_plot=4)
  spec = configs.read(config)
  task = tasks.build(spec)
  _, _, val = loaders.load(spec)
  state = train_state.create_train_state(jax.random.key(0), spec)
  _, per = task.make_evaluator(state.apply_fn)(train_state.raw_variables(state), val)
  task.plot_predictions(str(tmp_path), val, per)
  assert (tmp_path / "predictions.png").read_bytes().startswith(b"\x89PNG")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.png"]


def test_drawing_leaves_the_users_matplotlib_backend_alone(tmp_path):
  """The figures are drawn without pyplot: drawing a run's figure (plots imports matplotlib
  there) and rendering font digits keep whatever backend the user chose (a notebook's, say)."""
  import matplotlib

  from jaxloc import images, plots

  before = matplotlib.get_backend()
  matplotlib.use("svg")
  try:
    plots.plot_pr(np.linspace(0, 1, 5), np.ones(5), 0.5, str(tmp_path / "pr.png"))
    images.font_digits(fonts=("DejaVu Sans",))
    assert matplotlib.get_backend() == "svg"
  finally:
    matplotlib.use(before)
