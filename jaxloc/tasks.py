"""What a spec's task is: `build(spec)` returns the model, the training batches, the loss,
the evaluation and the answers of the spec's head (`spec.DigitHead`: the seed's task,
`SlotHead` or `DenseHead`: a scene case), each a function of explicit arguments, so the
train loop, the evaluator, the Predictor and the scripts call them instead of branching.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax

from jaxloc import answers, canvas, dense, evaluation, losses, metrics, model, scenes
from jaxloc.spec import DenseHead, DigitHead, SlotHead, Spec


class Task(NamedTuple):
  """Everything a run of one spec needs."""

  model: nn.Module
  sample_fn: Callable  # (data_key, step, digits, labels) -> training batch
  # (outputs, batch, hp=None) -> (loss, {name: scalar}); its weights are the spec's, or those
  # of `hp` (`Spec.hyperparameters`: a replica member's values, traced) when given
  loss_fn: Callable
  # (apply_fn, mesh, stacked) -> evaluator(variables, val) -> (summary, per); stacked: of
  # stacked variables (`model.variables`), a list of them (scored in one compiled call a batch)
  make_evaluator: Callable
  write_outputs: Callable  # (out_dir, val, per, history): the run's end: curves (scenes: COCO..)
  plot_predictions: Callable  # (out_dir, val, per): predictions.png (after every evaluation)
  answer: Callable  # jittable (model outputs) -> {name: array}: the Predictor's answers


def build(spec: Spec) -> Task:
  """The model, data, loss, evaluation and answers of the spec's task. Equal specs get the
  same Task object, and specs that differ only in what a program does not read (the
  validation size, the paths, the drawings) get the same model and functions (`_shared`):
  the jitted functions that take them as static arguments (the compiled train steps, the
  evaluation) trace them once per process."""
  # a task reads neither the seed, the schedule nor the replicas: runs that differ only there
  # share it
  shared = dataclasses.replace(spec, seed=0, schedule=None, replicas=None)
  return _build(shared, evaluation.SCENE_VAL_CHUNK)


@functools.lru_cache(maxsize=64)
def _build(spec: Spec, scene_val_chunk: int) -> Task:
  if isinstance(spec.head, DigitHead):
    return _digit_task(spec)
  if isinstance(spec.head, SlotHead):
    return _slot_task(spec, scene_val_chunk)
  return _dense_task(spec, scene_val_chunk)


@functools.lru_cache(maxsize=256)
def _shared(fn, *args, **kwargs):
  """`functools.partial(fn, *args, **kwargs)`, one object for equal arguments: jit compares
  static arguments by equality, and a partial (or a closure) is equal only to itself."""
  return functools.partial(fn, *args, **kwargs)


@functools.lru_cache(maxsize=64)
def _module(net: nn.Module) -> nn.Module:
  """The first module equal to `net`: `net.apply` (a bound method, in every train state and
  evaluation step) is equal only to the apply of the same module object."""
  return net


def _digit_task(spec: Spec) -> Task:
  head, data = spec.head, spec.data
  digit_args = dict(canvas_size=data.canvas_size)
  return Task(
    model=_module(
      model.Localizer(
        num_classes=10, conv_features=head.conv_features, dense_features=head.dense_features
      )
    ),
    sample_fn=_shared(canvas.training_batch, batch_size=data.batch_size, **digit_args),
    loss_fn=_weighted(losses.total_loss, spec),
    make_evaluator=lambda apply_fn, mesh=None, stacked=False: functools.partial(
      evaluation.evaluate,
      apply_fn,
      batch_size=data.eval_batch_size,
      mesh=mesh,
      stacked=stacked,
      **digit_args,
    ),
    write_outputs=evaluation.write_digit_outputs,
    plot_predictions=functools.partial(
      evaluation.plot_digit_predictions, num_plot=data.num_plot, **digit_args
    ),
    answer=answers.digit_answers,
  )


def _scene_sampler(spec: Spec):
  """Training scenes: digits drawn with replacement, batch t with key fold_in(data_key, t);
  or, with a training set on disk, the stored set read in keyed passes
  (`scenes.stored_training_batch`; `loaders.load` gives the set as `digits`, None as labels)."""
  data = spec.data
  if data.train_path:
    return _shared(_stored_batch, batch_size=data.batch_size)
  return _shared(_sampled_batch, **spec.scene.sample_args(data.batch_size, data.canvas_size))


def _stored_batch(data_key, step, stored_set, _, *, batch_size: int):
  return scenes.stored_training_batch(data_key, step, stored_set, batch_size=batch_size)


def _sampled_batch(data_key, step, digits, labels, **sample_args):
  return scenes.sample_scene(jax.random.fold_in(data_key, step), digits, labels, **sample_args)


def _scene_chunks(spec: Spec, max_chunk: int) -> tuple[int, Callable]:
  """(chunk, make_chunk(val, i)): how the validation scenes are made, `chunk` (at most
  `max_chunk`) at a time: drawn from the test digits (`evaluation.sampled_chunk`) or read
  from a set on disk."""
  chunk = min(max_chunk, spec.data.num_val)
  if spec.data.val_path:
    return chunk, _shared(evaluation.stored_chunk, chunk=chunk)
  sample_args = spec.scene.sample_args(chunk, spec.data.canvas_size)
  return chunk, _shared(evaluation.sampled_chunk, val_seed=spec.data.val_seed, **sample_args)


def _scene_evaluation(spec: Spec, score_chunk, max_chunk: int):
  """make_evaluator, write_outputs and plot_predictions of a scene task, given how a chunk
  is scored and its largest size."""
  scene, data = spec.scene, spec.data
  summarize = functools.partial(
    metrics.scene_summary,
    classify=scene.classify,
    digit_size=sum(scene.size_range) / 2 / data.canvas_size,
  )
  chunk, make_chunk = _scene_chunks(spec, max_chunk)

  def make_evaluator(apply_fn, mesh=None, stacked=False):
    mesh = mesh if chunk % jax.device_count() == 0 else None
    batch = math.gcd(chunk, data.eval_batch_size)  # scenes per model application
    step = functools.partial(
      evaluation.scene_eval_step,
      apply_fn=apply_fn,
      score_chunk=score_chunk,
      make_chunk=make_chunk,
      mesh=mesh,
      stacked=stacked,
      batch=batch,
    )
    return lambda variables, val: evaluation.evaluate_scenes(
      step, variables, val, summarize, chunk=chunk, num_val=data.num_val, stacked=stacked
    )

  write_outputs = functools.partial(
    evaluation.write_scene_outputs,
    canvas_size=data.canvas_size,
    num_plot=data.num_plot,
    categories=range(10) if scene.classify else [0],
    make_chunk=make_chunk,
  )
  plot_predictions = functools.partial(
    evaluation.plot_scene_predictions,
    num_plot=data.num_plot,
    classify=scene.classify,
    make_chunk=make_chunk,
  )
  return make_evaluator, write_outputs, plot_predictions


def _slot_loss_args(spec: Spec) -> dict:
  """Keyword arguments of `losses.scene_loss` (the slot detector's loss)."""
  head = spec.head
  return dict(
    classify=spec.scene.classify,
    count_weight=head.count_loss_weight,
    objectness_weight=head.objectness_loss_weight,
    class_weight=head.class_loss_weight,
    box_weight=head.box_loss_weight,
  )


def _slot_task(spec: Spec, max_chunk: int) -> Task:
  head, loss_args = spec.head, _slot_loss_args(spec)
  score_chunk = _shared(answers.slot_chunk, **loss_args)
  make_evaluator, write_outputs, plot_predictions = _scene_evaluation(spec, score_chunk, max_chunk)
  return Task(
    model=_module(
      model.Detector(
        max_objects=spec.scene.max_objects,
        num_classes=10,
        conv_features=head.conv_features,
        dense_features=head.dense_features,
      )
    ),
    sample_fn=_scene_sampler(spec),
    loss_fn=_weighted(_shared(losses.scene_loss, **loss_args), spec),
    make_evaluator=make_evaluator,
    write_outputs=write_outputs,
    plot_predictions=plot_predictions,
    answer=functools.partial(answers.slot_answers, classify=spec.scene.classify),
  )


def _dense_task(spec: Spec, max_chunk: int) -> Task:
  head: DenseHead = spec.head
  num_classes = 10 if spec.scene.classify else 1
  geometry = dict(canvas_size=spec.data.canvas_size, stride=head.stride)
  decode = _shared(dense.decode, k=head.top_k, **geometry)
  loss = _shared(
    dense.scene_loss, num_classes=num_classes, giou_weight=head.giou_loss_weight, **geometry
  )
  loss_fn = _weighted(loss, spec)
  answer = _shared(answers.dense_answers, decode=decode, threshold=head.score_threshold)
  score_chunk = _shared(answers.dense_chunk, answer=answer, loss_fn=loss_fn)
  make_evaluator, write_outputs, plot_predictions = _scene_evaluation(spec, score_chunk, max_chunk)
  net = model.DenseDetector(
    num_classes=num_classes,
    conv_features=head.conv_features,
    context_features=head.context_features,
    stride=head.stride,
    prior=head.prior,
    backbone=head.backbone,
    pyramid_features=head.pyramid_features,
    neck_features=head.neck_features,
    norm=head.norm,
  )
  return Task(
    model=_module(net),
    sample_fn=_scene_sampler(spec),
    loss_fn=loss_fn,
    make_evaluator=make_evaluator,
    write_outputs=write_outputs,
    plot_predictions=plot_predictions,
    answer=answer,
  )


def _weighted(loss, spec: Spec) -> Callable:
  """`loss(outputs, batch, **weights)` as a Task's loss_fn: the head's weights that members
  may vary (`VARIED`: loss argument -> config field), the spec's own or those of `hp`."""
  varied = tuple(spec.head.VARIED.items())
  own = spec.hyperparameters()
  return _shared(_weighted_loss, loss, varied, tuple((f, own[f]) for _, f in varied))


def _weighted_loss(loss, varied: tuple, own: tuple, outputs, batch, hp=None):
  """`_weighted`'s loss_fn: `varied` (loss argument, field) pairs, `own` (field, value)."""
  hp = dict(own) if hp is None else hp
  return loss(outputs, batch, **{arg: hp[field] for arg, field in varied})
