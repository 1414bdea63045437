"""Model outputs turned into answers, the same for the Predictor and the evaluator (all
jittable): class and box of the seed's model; detections, count and presence of the
scene detectors; and the per-canvas results of one chunk of validation scenes that
`metrics.scene_summary` scores.
"""

import jax
import jax.numpy as jnp

from jaxloc import boxes, dense, losses


def digit_answers(outputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """The seed model's answers: label [B], probs [B,C], score [B] (its probability), box [B,4]."""
  probs = jax.nn.softmax(outputs["logits"], axis=-1)
  return {
    "label": jnp.argmax(probs, axis=-1).astype(jnp.int32),
    "probs": probs,
    "score": jnp.max(probs, axis=-1),
    "box": outputs["box"],
  }


def slot_answers(outputs: dict[str, jax.Array], *, classify: bool) -> dict[str, jax.Array]:
  """The slot detector's answers. Per slot [B,K]: box, label, probs, objectness, score
  (objectness, x the class probability when classes are predicted) and keep (the `count`
  slots of highest objectness); per canvas [B]: count (argmax of the count head),
  count_probs, presence."""
  probs = jax.nn.softmax(outputs["logits"], -1)
  count_probs = jax.nn.softmax(outputs["count_logits"], -1)
  count = jnp.argmax(count_probs, -1).astype(jnp.int32)
  objectness = jax.nn.sigmoid(outputs["objectness"])
  score = objectness * jnp.max(probs, -1) if classify else objectness
  rank = jnp.argsort(jnp.argsort(-objectness, axis=-1), axis=-1)  # 0 = most object-like
  return {
    "box": outputs["box"],
    "label": jnp.argmax(probs, -1).astype(jnp.int32),
    "probs": probs,
    "objectness": objectness,
    "score": score,
    "keep": rank < count[:, None],
    "count": count,
    "count_probs": count_probs,
    "presence": count > 0,
  }


def dense_answers(outputs: dict[str, jax.Array], *, decode, threshold: float) -> dict:
  """The dense detector's answers: the top-k detections (`decode`: box, label, score [B,T]),
  keep [B,T] (primary, score >= threshold), count and presence [B] (`dense.answers`)."""
  det = decode(outputs)
  return {**det, **dense.answers(det, threshold)}


# --- Scoring one chunk of validation scenes: per-canvas results and loss parts ---


def _scene_results(scene, ans, matched_box, matched_label) -> dict[str, jax.Array]:
  return {
    "count": scene["count"],
    "valid": scene["valid"],
    "box": scene["box"],
    "label": scene["label"],
    "det_box": ans["box"],
    "det_label": ans["label"],
    "det_score": ans["score"],
    "det_keep": ans["keep"],
    "pred_count": ans["count"],
    "matched_box": matched_box,
    "matched_label": matched_label,
  }


def slot_chunk(outputs, scene, **loss_args) -> tuple[dict, dict]:
  """Slots: each target is matched to the slot `losses.assign_slots` gives it (the loss's
  set matching)."""
  cost_args = {k: loss_args[k] for k in ("classify", "class_weight", "box_weight")}
  assign = losses.assign_slots(outputs, scene, **cost_args)
  _, parts = losses.scene_loss(outputs, scene, assign=assign, **loss_args)
  ans = slot_answers(outputs, classify=loss_args["classify"])
  return _scene_results(
    scene, ans, losses.take_slots(ans["box"], assign), losses.take_slots(ans["label"], assign)
  ), parts


def dense_chunk(outputs, scene, *, answer, loss_fn) -> tuple[dict, dict]:
  """Dense detector: with one object per canvas at most, the target's answer is the top
  detection (case 3's class and box); with more, it is the kept detection (score >=
  threshold) of highest IoU with it (none kept: box zero, label -1). Also returns the
  class-max heatmap [B,G,G] for the heatmap picture."""
  _, parts = loss_fn(outputs, scene)
  ans = answer(outputs)  # `dense_answers` with the run's decoding and threshold
  k = scene["box"].shape[1]
  if k == 1:
    best = jnp.zeros(scene["valid"].shape, jnp.int32)
    found = jnp.ones(scene["valid"].shape, bool)
  else:
    iou = boxes.pairwise_iou(scene["box"], ans["box"])  # [B, K, T]
    iou = jnp.where(ans["keep"][:, None, :], iou, -1.0)
    best, found = jnp.argmax(iou, -1), jnp.any(ans["keep"], -1, keepdims=True)
    found = jnp.repeat(found, k, axis=1)
  matched_box = jnp.where(found[..., None], losses.take_slots(ans["box"], best), 0.0)
  matched_label = jnp.where(found, losses.take_slots(ans["label"], best), -1)
  results = _scene_results(scene, ans, matched_box, matched_label)
  results["heatmap"] = jnp.max(jax.nn.sigmoid(outputs["heatmap"]), axis=-1)
  return results, parts
