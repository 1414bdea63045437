"""Scoring a model on the fixed validation set, and the figures and files of a scoring.

The seed's task scores one canvas per MNIST test digit at fixed offsets; scene
cases score `num_val` scenes drawn from the test digits in chunks of
`SCENE_VAL_CHUNK`, chunk i with key `fold_in(key(val_seed), i)` (`sampled_chunk`), or the
scenes of a dataset on disk in order (`stored_chunk`). Either way
the validation set is the same in every run with the same config. Which of these a
config uses is decided by `jaxloc.tasks.build`; the functions here take explicit arguments.
A model's weights here are its flax `variables` (`model.variables`: the parameters, and
the running BatchNorm statistics when it has them).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxloc import canvas, metrics, parallel, plots, scenes, workdir


@functools.partial(jax.jit, static_argnames=("apply_fn", "canvas_size", "mesh", "stacked"))
def eval_step(apply_fn, variables, val, idx, mask, *, canvas_size: int, mesh=None, stacked=False):
  """Renders the validation canvases `idx` and returns (sums, per-canvas results); with
  `stacked`, `variables` are several models' (leading axis M) scored on the same batch,
  results [M, ...]."""
  batch = _canvases(val, idx, canvas_size=canvas_size)
  batch = parallel.shard_batch(batch, mesh)

  def score(p):
    outputs = apply_fn(p, batch["image"])
    return metrics.batch_sums(outputs, batch, mask), metrics.per_example(outputs, batch)

  return jax.vmap(score)(variables) if stacked else score(variables)


@functools.partial(jax.jit, static_argnames="canvas_size")
def _canvases(val: dict, idx, *, canvas_size: int):
  """The seed task's validation canvases `idx` (one program, not an eager op per array)."""
  digits, labels, xy = (val[k][idx] for k in ("digits", "labels", "xy"))
  return canvas.render(digits, labels, xy, canvas_size=canvas_size)


@functools.partial(jax.jit, static_argnames="members")
def _join(exported, raw, *, members: bool):
  """The exported weights, then the raw ones, as one stack: [2, ...], or for stacked
  replica members [2N, ...]."""
  join = jnp.concatenate if members else jnp.stack
  return jax.tree_util.tree_map(lambda *a: join(a), exported, raw)


def evaluate(
  apply_fn, variables, val: dict, *, canvas_size: int, batch_size: int, mesh=None, stacked=False
):
  """Scores the fixed validation set in batches of `batch_size` (the last one padded).

  Returns (summary dict, per-canvas results as numpy arrays); with `stacked` (stacked
  `variables` of M models, scored in one compiled call per batch), a list of M of them.
  """
  n = val["labels"].shape[0]
  val = jax.tree_util.tree_map(jnp.asarray, val)  # numpy copied once, not once per batch
  totals, per = None, []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = idx < n
    idx = np.minimum(idx, n - 1)
    sums, ex = eval_step(
      apply_fn,
      variables,
      val,
      jnp.asarray(idx),
      jnp.asarray(mask),
      canvas_size=canvas_size,
      mesh=mesh,
      stacked=stacked,
    )
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    keep = (lambda a, m=mask: a[:, m]) if stacked else (lambda a, m=mask: a[m])
    per.append(jax.tree_util.tree_map(keep, parallel.to_host(ex)))
  per = {k: np.concatenate([p[k] for p in per], axis=int(stacked)) for k in per[0]}
  totals = parallel.to_host(totals)
  if not stacked:
    return metrics.summarize(totals, per["iou"]), per
  return [
    (metrics.summarize(parallel.member(totals, i), p["iou"]), p) for i, p in enumerate(_split(per))
  ]


def _split(per: dict) -> list[dict]:
  """Per-canvas results [M, N, ...] of M models as M dicts of [N, ...]."""
  return [parallel.member(per, i) for i in range(len(next(iter(per.values()))))]


class RunEvaluation:
  """A run's scoring after each epoch: `self(exported, raw)` -> per model (replica member),
  (summary, per-canvas results, summary of the raw weights or None). `exported`: the
  weights a run exports (with `count` > 1, stacked [N, ...]); `raw`: with a moving
  average, the raw weights beside them, else None. All of them are scored in one compiled
  call per batch (`make_evaluator(apply_fn, mesh, stacked=True)`). `seconds`: time spent."""

  def __init__(self, make_evaluator, apply_fn, mesh, val, count: int, averaged: bool):
    self.stacked = count > 1 or averaged
    self.evaluator = make_evaluator(apply_fn, mesh, self.stacked)
    self.val, self.count, self.seconds = val, count, 0.0

  def __call__(self, exported, raw=None) -> list[tuple]:
    t = time.perf_counter()
    variables = exported if raw is None else _join(exported, raw, members=self.count > 1)
    scored = self.evaluator(variables, self.val)
    scored = scored if self.stacked else [scored]
    exported_scores, raw_scores = scored[: self.count], scored[self.count :]
    self.seconds += time.perf_counter() - t
    return [
      (s, p, raw_scores[i][0] if raw_scores else None) for i, (s, p) in enumerate(exported_scores)
    ]


SCENE_VAL_CHUNK = 500  # scene validation canvases per key: chunk i uses fold_in(val_key, i)


def sampled_chunk(val: dict, i, *, val_seed: int, **sample_args):
  """Chunk i of the validation scenes drawn from the test digits (val: digits, labels);
  `sample_args`: those of `scenes.sample_scene`."""
  key = jax.random.fold_in(jax.random.key(val_seed), i)
  return scenes.sample_scene(key, val["digits"], val["labels"], **sample_args)


def stored_chunk(val: dict, i, *, chunk: int):
  """Chunk i of a stored set (val: `jaxloc.datasets` arrays), in order; the last chunk
  wraps around to the start (`evaluate_scenes` drops what lies past the set's end)."""
  index = (i * chunk + jnp.arange(chunk)) % val["images"].shape[0]
  return scenes.stored_scene(val, index)


@functools.partial(
  jax.jit, static_argnames=("apply_fn", "score_chunk", "make_chunk", "mesh", "stacked", "batch")
)
def scene_eval_step(
  variables, i, val, *, apply_fn, score_chunk, make_chunk, mesh=None, stacked=False, batch=None
):
  """The scoring of chunk i of the validation scenes: makes it with `make_chunk(val, i)`
  (`sampled_chunk` or `stored_chunk`), applies the model `batch` scenes at a time (a divisor
  of the chunk; None: the whole chunk at once), which bounds the memory, and returns
  `score_chunk(outputs, scene)` = (per-canvas results, loss parts); with `stacked`, of
  several models' stacked `variables` on the same chunk (results [M, ...])."""

  def outputs(v, image):
    n = image.shape[0]
    if batch is None or batch >= n:
      return apply_fn(v, image)
    split = image.reshape(n // batch, batch, *image.shape[1:])
    out = jax.lax.map(lambda x: apply_fn(v, x), split)
    return jax.tree_util.tree_map(lambda a: a.reshape(n, *a.shape[2:]), out)

  scene = parallel.shard_batch(make_chunk(val, i), mesh)
  score = lambda p: score_chunk(outputs(p, scene["image"]), scene)
  return jax.vmap(score)(variables) if stacked else score(variables)


def evaluate_scenes(
  step, variables, val: dict, summarize, *, chunk: int, num_val: int, stacked=False
):
  """Scores the validation scenes with `step(variables, i, val)` (`scene_eval_step` with its
  static arguments) in chunks: `num_val` of them, or all of a stored set if it holds fewer;
  returns (summary, per-canvas numpy arrays), or with `stacked` a list of them, one per
  model."""
  if "images" in val:
    num_val = min(num_val, val["images"].shape[0])
  per, parts = [], []
  for i in range(-(-num_val // chunk)):
    ex, loss_parts = step(variables, i, val)
    per.append(parallel.to_host(ex))
    parts.append(parallel.to_host(loss_parts))
  axis = int(stacked)  # the canvases' axis
  cut = (slice(None),) * axis + (slice(num_val),)
  per = {k: np.concatenate([p[k] for p in per], axis)[cut] for k in per[0]}
  if not stacked:
    return _scene_summary(summarize, per, parts), per
  return [
    (_scene_summary(summarize, p, [parallel.member(q, i) for q in parts]), p)
    for i, p in enumerate(_split(per))
  ]


def _scene_summary(summarize, per: dict, parts: list[dict]) -> dict:
  """The figures of one model's scenes, with its loss parts averaged over the chunks."""
  summary = summarize(per)
  summary.update({k: float(np.mean([p[k] for p in parts])) for k in parts[0] if "_loss" in k})
  return summary


def write_digit_outputs(out_dir: str, val: dict, per: dict, history: list[dict]) -> None:
  """curves.png from the evaluation records (predictions.png: `plot_digit_predictions`)."""
  del val, per  # the seed's task writes no per-canvas files
  plots.plot_curves(history, os.path.join(out_dir, "curves.png"))


def _now(draw) -> None:
  draw()


def plot_digit_predictions(
  out_dir: str, val: dict, per: dict, *, canvas_size: int, num_plot: int, draw=_now
):
  """predictions.png: the first `num_plot` validation canvases, true and predicted boxes
  (none when `num_plot` is 0). The device work happens here; `draw(fn)` runs the drawing
  `fn()`: now by default, or later on another thread (`records.Log`)."""
  if num_plot == 0:
    return
  k = min(num_plot, len(per["iou"]))
  images = parallel.to_host(_canvases(val, np.arange(k), canvas_size=canvas_size))
  draw(
    functools.partial(
      plots.plot_predictions,
      images["image"][..., 0],
      images["box"],
      per["pred_box"][:k],
      per["pred_label"][:k],
      per["iou"][:k],
      os.path.join(out_dir, "predictions.png"),
      true_label_N=images["label"],
    )
  )


def write_scene_outputs(
  out_dir: str,
  val: dict,
  per: dict,
  history: list[dict],
  *,
  canvas_size: int,
  num_plot: int,
  categories,
  make_chunk,
) -> None:
  """curves.png, the COCO JSON files of the validation detections, pr.png and, for the
  dense detector, heatmap.png (its class-max heatmap beside the first `num_plot` validation
  scenes, when `num_plot` > 0; predictions.png: `plot_scene_predictions`)."""
  plots.plot_curves(history, os.path.join(out_dir, "curves.png"))
  classify = len(categories) > 1
  dets, gts = metrics.scene_detections(per, classify)
  gt_json, det_json = metrics.coco_json(dets, gts, canvas_size, len(per["count"]), categories)
  workdir.write_json(os.path.join(out_dir, "ground_truth.json"), gt_json)
  workdir.write_json(os.path.join(out_dir, "detections.json"), det_json)
  curve = metrics.average_precision(dets, gts, with_curve=True)
  plots.plot_pr(
    metrics.RECALL_POINTS, np.asarray(curve["pr50"]), curve["AP50"], os.path.join(out_dir, "pr.png")
  )
  if "heatmap" in per and num_plot > 0:
    image, first_per = _first_scenes(val, per, num_plot, make_chunk)
    plots.plot_heatmaps(image, first_per, os.path.join(out_dir, "heatmap.png"))


def plot_scene_predictions(
  out_dir: str, val: dict, per: dict, *, num_plot: int, classify: bool, make_chunk, draw=_now
) -> None:
  """predictions.png: kept detections on the first `num_plot` validation scenes (none when
  `num_plot` is 0; `draw`: as for `plot_digit_predictions`)."""
  if num_plot == 0:
    return
  image, first_per = _first_scenes(val, per, num_plot, make_chunk)
  path = os.path.join(out_dir, "predictions.png")
  draw(functools.partial(plots.plot_scenes, image, first_per, classify, path))


@functools.partial(jax.jit, static_argnames="make_chunk")
def _chunk(val: dict, i, *, make_chunk):
  """`make_chunk(val, i)` as one program (eagerly, each of its operations compiles alone)."""
  return make_chunk(val, i)


def _first_scenes(val: dict, per: dict, num_plot: int, make_chunk):
  """The first `num_plot` validation scenes (images [k,H,W]) and their per-canvas results."""
  k = min(num_plot, len(per["count"]))
  first = _chunk(val, 0, make_chunk=make_chunk)
  image = parallel.to_host(first["image"][:k, :, :, 0])
  return image, {name: a[:k] for name, a in per.items()}
