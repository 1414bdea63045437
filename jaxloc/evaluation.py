"""Scoring a model on the fixed validation set, and the figures and files of a scoring.

The seed's task scores one canvas per MNIST test digit at fixed offsets; scene
cases score `num_val` scenes drawn from the test digits in chunks of
`SCENE_VAL_CHUNK`, chunk i with key `fold_in(key(val_seed), i)`. Either way
the validation set is the same in every run with the same config.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxloc import canvas, losses, metrics, parallel, plots, tasks, workdir


@functools.partial(jax.jit, static_argnames=("apply_fn", "canvas_size", "mesh"))
def eval_step(apply_fn, params, digits, labels, xy, mask, *, canvas_size: int, mesh=None):
  """Renders one validation batch and returns (sums, per-canvas results)."""
  batch = parallel.shard_batch(canvas.render(digits, labels, xy, canvas_size=canvas_size), mesh)
  outputs = apply_fn({"params": params}, batch["image"])
  return metrics.batch_sums(outputs, batch, mask), metrics.per_example(outputs, batch)


def evaluate(apply_fn, params, val: dict, *, canvas_size: int, batch_size: int, mesh=None):
  """Scores the fixed validation set in batches of `batch_size` (the last one padded).

  Returns (summary dict, per-canvas results as numpy arrays).
  """
  n = val["labels"].shape[0]
  totals, per = None, []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < n
    idx = np.minimum(idx, n - 1)
    sums, ex = eval_step(
      apply_fn,
      params,
      val["digits"][idx],
      val["labels"][idx],
      val["xy"][idx],
      jnp.asarray(mask),
      canvas_size=canvas_size,
      mesh=mesh,
    )
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    per.append(jax.tree_util.tree_map(lambda a, m=mask: np.asarray(a)[m], ex))
  per = {k: np.concatenate([p[k] for p in per]) for k in per[0]}
  return metrics.summarize(jax.device_get(totals), per["iou"]), per


SCENE_VAL_CHUNK = 500  # scene validation canvases per key: chunk i uses fold_in(val_key, i)


def evaluate_scenes(apply_fn, params, val: dict, config, *, mesh=None):
  """Scores the fixed validation scenes; returns (summary, per-canvas numpy arrays)."""
  sc, n = config.scene, config.num_val if config.num_val > 0 else 10_000
  chunk = min(SCENE_VAL_CHUNK, n)
  step = _scene_eval_step(
    apply_fn,
    tuple(tasks.scene_args(config, chunk).items()),
    tasks.scene_loss_args(config),
    mesh if chunk % jax.device_count() == 0 else None,
  )
  val_key = jax.random.key(config.val_seed)
  per, parts = [], []
  for i in range(-(-n // chunk)):
    ex, loss_parts = step(params, jax.random.fold_in(val_key, i), val["digits"], val["labels"])
    per.append(jax.device_get(ex))
    parts.append(jax.device_get(loss_parts))
  per = {k: np.concatenate([p[k] for p in per])[:n] for k in per[0]}
  summary = metrics.scene_summary(per, sc.classify, np.mean(sc.size_range) / config.canvas_size)
  summary.update({k: float(np.mean([p[k] for p in parts])) for k in parts[0] if "_loss" in k})
  return summary, per


@functools.lru_cache(maxsize=8)
def _scene_eval_step(apply_fn, sample_args: tuple, loss_args: tuple, mesh):
  """The jitted scoring of one chunk of validation scenes (compiled once per config)."""
  args = dict(loss_args)
  cost_args = {k: args[k] for k in ("classify", "class_weight", "box_weight")}

  @jax.jit
  def step(params, key, digits, labels):
    scene = canvas.sample_scene(key, digits, labels, **dict(sample_args))
    scene = parallel.shard_batch(scene, mesh)
    out = apply_fn({"params": params}, scene["image"])
    assign = losses.assign_slots(out, scene, **cost_args)
    _, parts = losses.scene_loss(out, scene, assign=assign, **args)
    probs = jax.nn.softmax(out["logits"], -1)
    ex = {
      "count": scene["count"],
      "valid": scene["valid"],
      "box": scene["box"],
      "label": scene["label"],
      "assign": assign,
      "pred_box": out["box"],
      "pred_count": jnp.argmax(out["count_logits"], -1),
      "pred_label": jnp.argmax(probs, -1),
      "class_score": jnp.max(probs, -1),
      "objectness": jax.nn.sigmoid(out["objectness"]),
    }
    return ex, parts

  return step


def make_evaluator(config, apply_fn, mesh=None):
  """`evaluator(params, val) -> (summary, per-canvas arrays)` for the config's task."""
  if config.get("scene"):
    return lambda params, val: evaluate_scenes(apply_fn, params, val, config, mesh=mesh)
  return lambda params, val: evaluate(
    apply_fn,
    params,
    val,
    canvas_size=config.canvas_size,
    batch_size=config.eval_batch_size,
    mesh=mesh,
  )


def write_plots(out_dir: str, config, val: dict, per: dict, history: list[dict]) -> None:
  """curves.png from the evaluation records, predictions.png of the first validation canvases;
  for scenes also pr.png and the COCO JSON files of the validation detections."""
  plots.plot_curves(history, os.path.join(out_dir, "curves.png"))
  if config.get("scene"):
    _write_scene_outputs(out_dir, config, val, per)
    return
  k = min(config.num_plot, len(per["iou"]))
  images = canvas.render(
    val["digits"][:k], val["labels"][:k], val["xy"][:k], canvas_size=config.canvas_size
  )
  plots.plot_predictions(
    np.asarray(images["image"][..., 0]),
    np.asarray(images["box"]),
    per["pred_box"][:k],
    per["pred_label"][:k],
    per["iou"][:k],
    os.path.join(out_dir, "predictions.png"),
    true_label_N=np.asarray(val["labels"][:k]),
  )


def _write_scene_outputs(out_dir: str, config, val: dict, per: dict) -> None:
  classify = config.scene.classify
  dets, gts = metrics.scene_detections(per, classify)
  gt_json, det_json = metrics.coco_json(
    dets, gts, config.canvas_size, len(per["count"]), range(10) if classify else [0]
  )
  workdir.write_json(os.path.join(out_dir, "ground_truth.json"), gt_json)
  workdir.write_json(os.path.join(out_dir, "detections.json"), det_json)
  curve = metrics.average_precision(dets, gts, with_curve=True)
  plots.plot_pr(
    metrics.RECALL_POINTS, np.asarray(curve["pr50"]), curve["AP50"], os.path.join(out_dir, "pr.png")
  )
  k = min(config.num_plot, len(per["count"]))
  chunk = min(SCENE_VAL_CHUNK, config.num_val if config.num_val > 0 else 10_000)
  first = canvas.sample_scene(
    jax.random.fold_in(jax.random.key(config.val_seed), 0),
    val["digits"],
    val["labels"],
    **tasks.scene_args(config, chunk),
  )
  plots.plot_scenes(
    np.asarray(first["image"][:k, :, :, 0]),
    {name: a[:k] for name, a in per.items()},
    classify,
    os.path.join(out_dir, "predictions.png"),
  )
