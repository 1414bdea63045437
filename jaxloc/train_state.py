"""The train state and the jitted train step: pure functions of (state, batch), and
`compile_train_steps`, several steps per compiled call with the batches drawn on the
device (batch t depends only on (seed, t)); with replicas, several members in one program.
The run around them (logs, checkpoints, evaluation) is `jaxloc.train`.
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import train_state as flax_train_state

from jaxloc import model, parallel, tasks
from jaxloc.spec import Optimizer, Spec


class TrainState(flax_train_state.TrainState):
  """Flax's TrainState plus `ema_params`, a moving average of `params` (None when off), and
  `batch_stats`, the BatchNorm running statistics (None when the model has no BatchNorm)."""

  ema_params: Any = None
  batch_stats: Any = None


def ema_update(ema_params, params, decay: float, step: jax.Array):
  """One step of the exponential moving average `ema <- d * ema + (1 - d) * params`.

  d = min(decay, (1 + step) / (10 + step)): the warm-up of TensorFlow's
  ExponentialMovingAverage, so early averages do not hold on to the random init.
  Training never reads the average; it only changes which weights are evaluated.
  """
  t = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
  return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)


def exported_params(state: TrainState):
  """The weights a run evaluates and writes to params.msgpack: the average when kept."""
  return state.params if state.ema_params is None else state.ema_params


def exported_variables(state: TrainState) -> dict:
  """What a run evaluates: `exported_params` with the running BatchNorm statistics."""
  return model.variables(exported_params(state), state.batch_stats)


def raw_variables(state: TrainState) -> dict:
  """The raw (not averaged) weights with the running BatchNorm statistics."""
  return model.variables(state.params, state.batch_stats)


def learning_rate(opt: Optimizer, peak=None) -> optax.ScalarOrSchedule:
  """`peak` (default `opt.learning_rate`) held constant (the seed), or with `lr_schedule =
  "cosine"` a linear warm-up over `warmup_steps` to it, then a cosine decay to 0 at the last
  step. `peak` may be traced (a replica member's value, `Spec.hyperparameters`)."""
  peak = opt.learning_rate if peak is None else peak
  if opt.lr_schedule == "constant":
    return peak
  # optax.warmup_cosine_decay_schedule(0, peak, warmup, total, 0) as its parts: that function
  # compares `peak` with 0 in Python, which a traced peak cannot answer
  warmup = opt.warmup_steps
  total = max(opt.total_steps, warmup + 1)
  return optax.join_schedules(
    [
      optax.linear_schedule(0.0, peak, warmup),
      optax.cosine_decay_schedule(peak, total - warmup, alpha=0.0),
    ],
    [warmup],
  )


def optimizer_fn(opt: Optimizer):
  """`peak -> optimizer(opt, peak)`, the train step's `optimizer_fn`: one object for the
  optimizers that differ only in what it does not read (`_adam`; the peak is the argument),
  so their compiled steps share one trace."""
  return _optimizer_fn(dataclasses.replace(_adam(opt), learning_rate=0.0))


@functools.cache
def _optimizer_fn(opt: Optimizer):
  return functools.partial(optimizer, opt)


def _adam(opt: Optimizer) -> Optimizer:
  """`opt` without what `optimizer(opt)` does not read: the moving average's decay, and a
  constant step size's warm-up and length (zeros)."""
  if opt.lr_schedule == "constant":
    opt = dataclasses.replace(opt, warmup_steps=0, total_steps=0)
  return dataclasses.replace(opt, ema_decay=0.0)


def optimizer(opt: Optimizer, peak=None) -> optax.GradientTransformation:
  """Adam with Keras' defaults (epsilon 1e-7, not optax's 1e-8), as the seed used. Its state
  does not depend on `peak`, so one built with a traced step size updates the state that
  `create_train_state` made."""
  return optax.adam(learning_rate(opt, peak), b1=0.9, b2=0.999, eps=1e-7)


def create_train_state(key: jax.Array, spec: Spec, net: nn.Module | None = None) -> TrainState:
  """The state before step 1: `net` (default: the spec's model) initialised from `key`."""
  net = tasks.build(spec).model if net is None else net
  ema = spec.opt.ema_decay > 0
  return _initial_state(
    key, net=net, canvas_size=spec.data.canvas_size, opt=_adam(spec.opt), ema=ema
  )


@functools.partial(jax.jit, static_argnames=("net", "canvas_size", "opt", "ema"))
def _initial_state(key: jax.Array, *, net: nn.Module, canvas_size: int, opt: Optimizer, ema: bool):
  """`create_train_state` as one program, traced once per model, optimizer (`_adam`) and
  whether a moving average is kept: run eagerly, each optimizer zero and parameter copy
  would be compiled on its own."""
  variables = model.init_variables(key, net, canvas_size)
  params, stats = variables["params"], variables.get("batch_stats")
  ema = jax.tree_util.tree_map(jnp.copy, params) if ema else None
  state = TrainState.create(
    apply_fn=net.apply, params=params, tx=optimizer(opt), ema_params=ema, batch_stats=stats
  )
  return state.replace(step=jnp.zeros((), jnp.int32))  # an array, so checkpoints restore it


def step_hyperparameters(spec: Spec) -> dict[str, jax.Array]:
  """The `hp` argument of the train step (`Spec.hyperparameters`, as float32)."""
  return {k: jnp.float32(v) for k, v in spec.hyperparameters().items()}


def train_step(
  state: TrainState, batch, hp: dict[str, jax.Array], *, loss_fn, optimizer_fn
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam step on `loss_fn(outputs, batch, hp) -> (loss, parts)`; returns the parts.

  `hp` (`step_hyperparameters`) are arguments, not constants: the step size goes to
  `optimizer_fn(peak)` (e.g. `functools.partial(optimizer, spec.opt)`), the loss weights to
  `loss_fn`, and when the state keeps a moving average, `hp["ema_decay"]` to `ema_update`.
  A model with BatchNorm normalises by the batch's statistics (over the whole global batch
  when it is sharded) and the step updates the running ones.
  """

  def objective(params):  # -> (loss, (parts, the updated running statistics or None))
    variables, image = model.variables(params, state.batch_stats), batch["image"]
    if state.batch_stats is None:
      outputs, stats = state.apply_fn(variables, image), None
    else:
      outputs, updated = state.apply_fn(variables, image, train=True, mutable=["batch_stats"])
      stats = updated["batch_stats"]
    loss, parts = loss_fn(outputs, batch, hp)
    return loss, (parts, stats)

  grads, (step_metrics, stats) = jax.grad(objective, has_aux=True)(state.params)
  updates, opt_state = optimizer_fn(hp["learning_rate"]).update(
    grads, state.opt_state, state.params
  )
  params = optax.apply_updates(state.params, updates)
  state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=stats)
  if state.ema_params is not None:
    state = state.replace(
      ema_params=ema_update(state.ema_params, state.params, hp["ema_decay"], state.step)
    )
  return state, step_metrics


def zero_metrics(state, digits, labels, *, sample_fn, loss_fn) -> dict[str, jax.Array]:
  """Zeros shaped like the metrics of one step (found by tracing, nothing is computed)."""
  static = dict(apply_fn=state.apply_fn, sample_fn=sample_fn, loss_fn=loss_fn)
  shapes = _step_metrics.eval_shape(raw_variables(state), state.step, digits, labels, **static)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("apply_fn", "sample_fn", "loss_fn"))
def _step_metrics(variables, step, digits, labels, *, apply_fn, sample_fn, loss_fn):
  """The metrics of a step on the first batch, without the gradient: jitted so that a
  second run of one Task (equal static arguments) finds their shapes without tracing."""
  batch = sample_fn(jax.random.key(0), step, digits, labels)
  return loss_fn(apply_fn(variables, batch["image"]), batch)[1]


def train_steps(
  state: TrainState,
  sums: dict[str, jax.Array],
  digits: jax.Array,
  labels: jax.Array,
  data_key: jax.Array,
  hp: dict[str, jax.Array],
  num_steps: int | jax.Array | None,
  *,
  sample_fn,
  loss_fn,
  optimizer_fn,
  mesh: jax.sharding.Mesh | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`num_steps` steps of `train_step`, each on a fresh batch drawn on the device; adds the
  metrics to `sums`. `num_steps`: an int or an int32 scalar, a loop of that many steps (traced,
  the count is an argument of the program: one program for every count); None, one step
  without a loop (an accelerator would wait for a loop's condition on the host each step).

  Batch t is `sample_fn(data_key, t, digits, labels)`. With a `mesh`, every
  batch is sharded over its `data` axis (data parallelism).
  """

  def one(_, carry):
    state, sums = carry
    batch = sample_fn(data_key, state.step, digits, labels)
    batch = parallel.shard_batch(batch, mesh)
    state, m = train_step(state, batch, hp, loss_fn=loss_fn, optimizer_fn=optimizer_fn)
    return state, jax.tree_util.tree_map(jnp.add, sums, m)

  if num_steps is None:
    return one(0, (state, sums))
  return jax.lax.fori_loop(0, num_steps, one, (state, sums))


def compile_train_steps(
  state: TrainState,
  sums,
  digits,
  labels,
  data_key,
  hp,
  *,
  num_steps: int,
  replicas: str | None = None,
  mesh: jax.sharding.Mesh | None = None,
  **static,
):
  """`num_steps` steps of `train_steps`, jitted and compiled for these arguments; `static` are
  its other keyword arguments (`sample_fn`, `loss_fn`, `optimizer_fn`). Returns a
  `CompiledSteps`, `fn(state, sums, digits, labels, data_key, hp) -> (state, sums)`, which
  donates `state` and `sums` (`zero_metrics` gives the first sums).

  With `replicas` ("vmap" or "map"), `state`, `sums`, `data_key` and `hp` are stacked members
  (`parallel.stack`; leading axis N) trained in one program on the same `digits` and `labels`:
  `jax.vmap` batches the members' steps into one, `lax.map` loops over them.

  The static arguments are compared by equality: equal ones (the functions of one
  `tasks.build` Task, one `optimizer_fn` object) reuse the program traced before. One step is
  a program of its own; every larger `num_steps` shares one, whose loop count is an argument
  (a run whose epoch or records cut a call short compiles its steps once).
  """
  count = None
  if num_steps > 1:  # on the devices once, not sent with every call
    count = np.int32(num_steps)
    count = jax.device_put(count) if mesh is None else parallel.replicate(count, mesh)
  args = (state, sums, digits, labels, data_key, hp, count)
  fn = _jitted_train_steps.lower(*args, replicas=replicas, mesh=mesh, **static).compile()
  return CompiledSteps(fn, count)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """`compiled` (a `jax.stages.Compiled` of `train_steps`) with its step count bound: called
  as `fn(state, sums, digits, labels, data_key, hp)`."""

  compiled: Any
  count: Any  # None (one step) or an int32 scalar

  def __call__(self, state, sums, *data):
    return self.compiled(state, sums, *data, self.count)


@functools.partial(
  jax.jit,
  static_argnames=("replicas", "sample_fn", "loss_fn", "optimizer_fn", "mesh"),
  donate_argnums=(0, 1),
)
def _jitted_train_steps(state, sums, digits, labels, data_key, hp, count, *, replicas, **static):
  fn = functools.partial(train_steps, **static)
  if replicas == "vmap":
    fn = jax.vmap(fn, in_axes=(0, 0, None, None, 0, 0, None))
  elif replicas == "map":
    one = fn
    fn = lambda s, m, d, lab, k, h, n: jax.lax.map(
      lambda a: one(a[0], a[1], d, lab, a[2], a[3], n), (s, m, k, h)
    )
  return fn(state, sums, digits, labels, data_key, hp, count)


class Steps:
  """Calls compiled `train_steps`, compiled once for each number of steps (every number above
  one shares a program); times both."""

  def __init__(self, state, data, **static):
    self.data, self.static = data, static  # data: (digits, labels, data_key, hp)
    fns = dict(sample_fn=static["sample_fn"], loss_fn=static["loss_fn"])
    one = parallel.member(state, 0) if static["replicas"] else state
    self.template = zero_metrics(one, *data[:2], **fns)
    if static["replicas"]:
      n = jax.tree_util.tree_leaves(state)[0].shape[0]
      self.template = parallel.stack([self.template] * n)
    self.compiled, self.compile_s, self.train_s, self.trained = {}, 0.0, 0.0, 0

  def zeros(self) -> dict[str, jax.Array]:
    return jax.tree_util.tree_map(jax.numpy.zeros_like, self.template)

  def __call__(self, state, sums, n: int):
    """`n` training steps: (state, sums) -> (state, sums). Dispatches without waiting."""
    if n not in self.compiled:
      t = time.perf_counter()
      fn = compile_train_steps(state, sums, *self.data, num_steps=n, **self.static)
      self.compiled[n] = fn
      self.compile_s += time.perf_counter() - t
    t = time.perf_counter()
    state, sums = self.compiled[n](state, sums, *self.data)
    self.train_s += time.perf_counter() - t
    self.trained += n
    return state, sums

  def fetch(self, sums) -> dict[str, np.ndarray]:
    """The metric sums on the host: the only host sync of the hot loop (timed as training)."""
    t = time.perf_counter()
    fetched = parallel.to_host(sums)
    self.train_s += time.perf_counter() - t
    return fetched

  def images_per_s(self, batch_size: int) -> float:
    """Images per second of one member (replicas: each member's share of the program)."""
    return self.trained * batch_size / self.train_s if self.train_s > 0 else 0.0
