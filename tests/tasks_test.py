"""tasks.build: the model, sampler, loss and answers of each kind of config, and its checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_digits

from experiments.configs import digit, multi, presence
from jaxloc import configs, model, tasks


def _benchmark_layout():
  """mnist_detection.py (fpn, additive ink, ink boxes) on a smaller canvas."""
  from experiments.configs import mnist_detection

  config = mnist_detection.get_config()
  config.update(dict(canvas_size=96, batch_size=4))
  config.scene.size_range = (15, 40)
  return config


def _multi(head):
  config = multi.get_config()
  config.update(dict(head=head, canvas_size=64, batch_size=4))
  return config


@pytest.mark.parametrize(
  "config,model_type,answer_keys",
  [
    (digit.get_config(), model.Localizer, {"label", "probs", "score", "box"}),
    (_multi("dense"), model.DenseDetector, {"box", "label", "score", "keep", "count"}),
    (_multi("slots"), model.Detector, {"box", "label", "score", "keep", "count"}),
    (_benchmark_layout(), model.DenseDetector, {"box", "label", "score", "keep", "count"}),
  ],
  ids=["digit", "dense", "slots", "benchmark_fpn"],
)
def test_build_gives_a_consistent_task(config, model_type, answer_keys):
  """Sampler, model, loss and answers fit together: a batch gives a finite loss and
  answers with one row per canvas."""
  task = tasks.build(configs.read(config))
  assert type(task.model) is model_type
  batch = task.sample_fn(jax.random.key(0), jnp.zeros((), jnp.int32), *random_digits())
  variables = model.init_variables(jax.random.key(1), task.model, config.canvas_size)

  @jax.jit
  def loss_and_answers(variables, batch):
    outputs = task.model.apply(variables, batch["image"])
    return task.loss_fn(outputs, batch), task.answer(outputs)

  (loss, parts), answers = loss_and_answers(variables, batch)
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in parts.values())
  assert answer_keys <= set(answers)
  assert all(a.shape[0] == batch["image"].shape[0] for a in answers.values())


def test_single_class_cases_answer_presence():
  config = presence.get_config()  # one class at 128 px: 256 cells >= its top_k of 100
  config.batch_size = 4
  task = tasks.build(configs.read(config))
  batch = task.sample_fn(jax.random.key(0), jnp.zeros((), jnp.int32), *random_digits())
  params = model.init_params(jax.random.key(1), task.model, config.canvas_size)
  answers = jax.jit(lambda p, x: task.answer(task.model.apply({"params": p}, x)))(
    params, batch["image"]
  )
  assert answers["presence"].dtype == bool and answers["presence"].shape == (4,)
  np.testing.assert_array_equal(answers["presence"], answers["count"] > 0)
