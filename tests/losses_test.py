"""Losses: the seed's class + box loss, and the masked, set-matched scene loss."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxloc import losses

# Jitted: run eagerly, each of its ops would be compiled on its own.
LOSS = jax.jit(
  functools.partial(
    losses.scene_loss,
    classify=True,
    count_weight=1.0,
    objectness_weight=1.0,
    class_weight=1.0,
    box_weight=1.0,
  ),
  static_argnames=("classify",),
)
match = jax.jit(losses.match)
match_cost = jax.jit(losses.match_cost, static_argnames=("classify",))


def _outputs(key, b=4, k=3, c=10):
  ks = jax.random.split(key, 4)
  return {
    "count_logits": jax.random.normal(ks[0], (b, k + 1)),
    "objectness": jax.random.normal(ks[1], (b, k)),
    "logits": jax.random.normal(ks[2], (b, k, c)),
    "box": jax.random.uniform(ks[3], (b, k, 4)),
  }


def _scene(valid):
  valid = jnp.asarray(valid, bool)
  b, k = valid.shape
  box = jnp.where(valid[..., None], jax.random.uniform(jax.random.key(9), (b, k, 4)), 0.0)
  label = jnp.where(valid, jnp.arange(b * k).reshape(b, k) % 10, 0)
  return {"valid": valid, "box": box, "label": label, "count": valid.sum(1)}


def test_seed_loss_hand_computed():
  outputs = {"logits": jnp.array([[0.0, 0.0]]), "box": jnp.array([[0.1, 0.2, 0.3, 0.4]])}
  batch = {"label": jnp.array([1]), "box": jnp.array([[0.1, 0.2, 0.5, 0.4]])}
  loss, parts = losses.total_loss(outputs, batch, class_weight=1.0, box_weight=2.0)
  assert float(parts["class_loss"]) == pytest.approx(np.log(2))
  assert float(parts["box_loss"]) == pytest.approx(0.04 / 4)
  assert float(loss) == pytest.approx(np.log(2) + 2 * 0.01)


def test_empty_canvases_give_finite_loss_and_zero_box_loss():
  scene = _scene(np.zeros((4, 3), bool))
  loss, parts = LOSS(_outputs(jax.random.key(0)), scene)
  assert np.isfinite(float(loss))
  assert float(parts["box_loss"]) == 0.0 and float(parts["class_loss"]) == 0.0
  grads = jax.jit(jax.grad(lambda o: LOSS(o, scene)[0]))(_outputs(jax.random.key(0)))
  assert float(jnp.abs(grads["box"]).max()) == 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize("k", [2, 3, 6])
def test_swapping_predicted_slots_does_not_change_the_loss(k):
  valid = np.ones((4, k), bool)
  valid[1, -1] = valid[2, :] = False
  scene = _scene(valid)
  out = _outputs(jax.random.key(1), k=k)
  perm = jnp.array([1, 0] + list(range(2, k)))
  swapped = {name: a if name == "count_logits" else a[:, perm] for name, a in out.items()}
  a, b = LOSS(out, scene)[1], LOSS(swapped, scene)[1]
  for name in a:
    assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-6), name


def test_hungarian_matches_exhaustive_search():
  k = 6
  cost = jax.random.uniform(jax.random.key(2), (5, k, k))
  valid = jnp.ones((5, k), bool)
  assign = np.asarray(match(cost, valid))  # K = 6 uses the Hungarian algorithm
  cost = np.asarray(cost)
  for b in range(5):
    assert sorted(assign[b]) == list(range(k))
    best = min(sum(cost[b, p[j], j] for j in range(k)) for p in itertools.permutations(range(k)))
    assert float(sum(cost[b, assign[b, j], j] for j in range(k))) == pytest.approx(float(best))


def test_matching_follows_the_boxes():
  scene = _scene(np.ones((1, 2), bool))
  out = _outputs(jax.random.key(3), b=1, k=2)
  out["box"] = scene["box"][:, ::-1]  # predictions in the other order, otherwise exact
  assign = match(match_cost(out, scene, classify=False), scene["valid"])
  assert assign.tolist() == [[1, 0]]
  assert float(LOSS(out, scene, classify=False)[1]["box_loss"]) == 0.0


def test_confident_wrong_classes_do_not_override_far_apart_boxes():
  scene = _scene(np.ones((1, 2), bool))
  scene["box"] = jnp.array([[[0.1, 0.1, 0.3, 0.3], [0.7, 0.7, 0.9, 0.9]]])
  scene["label"] = jnp.array([[3, 5]])
  out = _outputs(jax.random.key(4), b=1, k=2)
  out["box"] = scene["box"]  # slot i sits exactly on target i ...
  out["logits"] = 10.0 * jax.nn.one_hot(jnp.array([[5, 3]]), 10)  # ... but names the other class
  cost = match_cost(out, scene, classify=True, class_weight=1.0, box_weight=10.0)
  assert match(cost, scene["valid"]).tolist() == [[0, 1]]
