"""Per-head losses of the localiser and their weighted total.

Class: softmax cross-entropy on integer labels (the seed's categorical
cross-entropy on one-hot labels). Box: mean squared error over the 4 normalised
coordinates (Keras' `mse`: mean over coordinates, then over the batch).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import optax


def class_loss(logits_BxC: jax.Array, label_B: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, label_B)


def box_loss(pred_Bx4: jax.Array, true_Bx4: jax.Array) -> jax.Array:
  """Per-example mean squared error over the 4 box numbers [B]."""
  return jnp.mean(jnp.square(pred_Bx4 - true_Bx4), axis=-1)


@jax.jit
def total_loss(
  outputs: dict[str, jax.Array], batch, *, class_weight: float = 1.0, box_weight: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted batch-mean loss and its parts."""
  cls = jnp.mean(class_loss(outputs["logits"], batch["label"]))
  box = jnp.mean(box_loss(outputs["box"], batch["box"]))
  loss = class_weight * cls + box_weight * box
  accuracy = jnp.mean(jnp.argmax(outputs["logits"], -1) == batch["label"])
  return loss, {"loss": loss, "class_loss": cls, "box_loss": box, "accuracy": accuracy}


# --- Scenes: K slots, matched to the targets as a set ---

EXHAUSTIVE_MAX_K = 5  # up to 5! = 120 permutations; above that, the Hungarian algorithm


def take_slots(a_BxKx: jax.Array, index_BxJ: jax.Array) -> jax.Array:
  """`a[b, index[b, j], ...]` for every b, j: the rows of per-slot arrays [B,K,...] that an
  assignment or a matching [B,J] names."""
  return jnp.take_along_axis(
    a_BxKx, index_BxJ.reshape(index_BxJ.shape + (1,) * (a_BxKx.ndim - 2)), 1
  )


def match_cost(
  outputs: dict[str, jax.Array],
  scene,
  *,
  classify: bool,
  class_weight: float = 1.0,
  box_weight: float = 1.0,
) -> jax.Array:
  """cost[b, i, j] of giving predicted slot i to target j:
  box_weight x box MSE (- class_weight x the probability slot i gives target j's class).

  The class term is a probability, not a cross-entropy (as in DETR's matcher): bounded,
  so while the class logits are still noise they cannot outweigh the boxes and
  scramble the assignment (with cross-entropy the boxes of `multi` stalled at the mean).
  """
  k = scene["box"].shape[1]
  pred = jnp.repeat(outputs["box"][:, :, None, :], k, axis=2)  # [B, Kpred, Ktarget, 4]
  true = jnp.repeat(scene["box"][:, None, :, :], k, axis=1)
  cost = box_weight * box_loss(pred, true)
  if classify:
    prob = jax.nn.softmax(outputs["logits"], axis=-1)  # [B, K, C]
    label = jnp.repeat(scene["label"][:, None, :], k, axis=1)  # [B, Kpred, Ktarget]
    cost = cost - class_weight * jnp.take_along_axis(prob, label, axis=2)
  return cost


def match(cost_BxKxK: jax.Array, valid_BxK: jax.Array) -> jax.Array:
  """For each target slot j, the predicted slot assigned to it: int32 [B, K].

  Minimises the total cost over valid targets; empty targets take the remaining
  predicted slots. Exhaustive over permutations for K <= 5, Hungarian above.
  """
  k = cost_BxKxK.shape[-1]
  cost = jnp.where(valid_BxK[:, None, :], cost_BxKxK, 0.0)
  if k <= EXHAUSTIVE_MAX_K:
    perms = jnp.asarray(list(itertools.permutations(range(k))), jnp.int32)  # [P, K]
    target = jnp.arange(k)
    total = cost[:, perms, target[None, :]].sum(-1)  # [B, P]
    return perms[jnp.argmin(total, axis=1)]

  def one(c):
    rows, cols = optax.assignment.hungarian_algorithm(c)
    return jnp.zeros(k, jnp.int32).at[cols].set(rows.astype(jnp.int32))

  return jax.vmap(one)(cost)


def assign_slots(
  outputs: dict[str, jax.Array], scene, *, classify: bool, class_weight: float, box_weight: float
) -> jax.Array:
  """The matching of predicted slots to the scene's targets (`match` of `match_cost`)."""
  cost = match_cost(
    outputs, scene, classify=classify, class_weight=class_weight, box_weight=box_weight
  )
  return match(cost, scene["valid"])


@functools.partial(jax.jit, static_argnames="classify")
def scene_loss(
  outputs: dict[str, jax.Array],
  scene,
  *,
  classify: bool,
  count_weight: float,
  objectness_weight: float,
  class_weight: float,
  box_weight: float,
  assign: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Count cross-entropy + slot objectness BCE + matched class CE + matched box MSE.

  Class and box losses average over the valid targets of the batch (zero, not NaN,
  when the batch holds none). Matching is set-based, so swapping predicted slots
  does not change the loss. `assign`: the `assign_slots` result with these weights when
  the caller has already computed it; found here otherwise.
  """
  valid = scene["valid"]
  if assign is None:
    weights = dict(class_weight=class_weight, box_weight=box_weight)
    assign = assign_slots(outputs, scene, classify=classify, **weights)
  assign = jax.lax.stop_gradient(assign)
  take = lambda a: take_slots(a, assign)
  v = valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(v), 1.0)
  box = jnp.sum(v * box_loss(take(outputs["box"]), scene["box"])) / n
  cls = jnp.sum(v * class_loss(take(outputs["logits"]), scene["label"])) / n
  # A predicted slot is an object when some valid target is assigned to it.
  is_object = jnp.zeros_like(v).at[jnp.arange(v.shape[0])[:, None], assign].max(v)
  obj = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["objectness"], is_object))
  count = jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(outputs["count_logits"], scene["count"])
  )
  loss = count_weight * count + objectness_weight * obj + box_weight * box
  if classify:
    loss = loss + class_weight * cls
  parts = {
    "loss": loss,
    "count_loss": count,
    "objectness_loss": obj,
    "box_loss": box,
    "count_accuracy": jnp.mean(jnp.argmax(outputs["count_logits"], -1) == scene["count"]),
  }
  if classify:
    parts["class_loss"] = cls
  return loss, parts
