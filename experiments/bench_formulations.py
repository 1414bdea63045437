"""Benchmark parts that compare ways of writing the seed model's step on this machine's CPU
(issue: jaxloc against Keras on AVX2 and AVX-512 CPUs), so the choice can be re-checked on
the next one: its 3x3 convolutions (`conv_formulations`: forward and gradient alone;
`conv_steps`: the whole training step) and its 2x2 pools (`pools`)."""

from experiments import bench_seed
from experiments.bench_seed import BATCH, CANVAS

FORMULATIONS = (
  "jaxloc",
  "gather",
  "slices",
  "shifted",
  "first_madd",
  "bf16",
  "lax",
  "vjp",
  "lax_fwd",
)
POOLS = ("reshape", "window", "slices")
STEP_CONVS = ("jaxloc", "gather", "patches_first", "first_grad_gather")


def conv_formulations(steps):
  """The seed model's forward and gradient, ms per batch of 64, with each way of writing
  its 3x3 convolutions tried on CPU (issue: jaxloc against Keras on AVX-512), so the
  choice can be re-checked on the next CPU. The parameters are the same in all.

    jaxloc     `model.conv3x3_valid`: `gather`'s forward (9 multiply-adds when one input
               channel), its own gradient: the kernel's from the kept patches (one input
               channel: the kernel's and the bias' as one product of the 9 shifted input
               planes and a row of ones), the input's as XLA's convolution of the padded
               output gradient with the flipped kernel
    gather     one gather builds all patches, one matrix product, XLA's gradient of it
               (jaxloc's Conv3x3 until 2026-11-30; the input's gradient is a scatter-add)
    slices     the patches from 9 slices + concatenate, one matrix product
    shifted    9 matrix products of shifted inputs, summed (no patch tensor)
    first_madd the first (1-channel) conv as 9 multiply-adds, the others as `gather`
    bf16       `gather` with bfloat16 operands, float32 accumulation
    lax        XLA's convolution (`jax.lax.conv_general_dilated`)
    vjp        `gather` with its own gradient: the input's as a `gather` correlation of the
               padded output gradient with the flipped kernel (a matrix product, instead of
               the scatter-add that is the gather's transpose); the kernel's from the
               patches recomputed
    lax_fwd    XLA's convolution forward, with its own gradient: the input's as XLA's
               convolution of the padded output gradient with the flipped kernel, the
               kernel's from `gather` patches (XLA:CPU's own kernel gradient is the slow part)
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from jaxloc import model

  def slice_patches(x, ho, wo):  # [B, Ho, Wo, 9C] in (dy, dx, c) order, as model._patches
    cols = [x[:, dy : dy + ho, dx : dx + wo] for dy in range(3) for dx in range(3)]
    return jnp.concatenate(cols, axis=-1)

  def xla_conv(x, kernel):
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=dims)

  def gather_correlation(g, kernel):  # the input's gradient as `gather` of the padded g
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))  # [3, 3, F, C]
    return _gather_conv(jnp.pad(g, ((0, 0), (2, 2), (2, 2), (0, 0))), flipped)

  vjp_conv = _own_gradient(_gather_conv, gather_correlation)
  lax_fwd_conv = _own_gradient(xla_conv, model._input_gradient)

  def conv(x, kernel, bias, how, first):
    if how == "jaxloc":
      return model.conv3x3_valid(x, kernel, bias)
    return conv_no_bias(x, kernel, how, first) + bias

  def conv_no_bias(x, kernel, how, first):
    if how in ("vjp", "lax_fwd"):
      return (vjp_conv if how == "vjp" else lax_fwd_conv)(x, kernel)
    b, h, w, c = x.shape
    ho, wo, f = h - 2, w - 2, kernel.shape[-1]
    if how == "lax":
      return xla_conv(x, kernel)
    if how == "shifted" or (how == "first_madd" and first):
      terms = [
        x[:, dy : dy + ho, dx : dx + wo] @ kernel[dy, dx]
        if how == "shifted"
        else x[:, dy : dy + ho, dx : dx + wo] * kernel[dy, dx, 0]
        for dy in range(3)
        for dx in range(3)
      ]
      return sum(terms[1:], terms[0])
    p = slice_patches(x, ho, wo) if how == "slices" else model._patches(x)
    p, k = p.reshape(b * ho * wo, 9 * c), kernel.reshape(9 * c, f)
    if how == "bf16":
      y = jnp.dot(
        p.astype(jnp.bfloat16), k.astype(jnp.bfloat16), preferred_element_type=jnp.float32
      )
    else:
      y = p @ k
    return y.reshape(b, ho, wo, f)

  class Seed(nn.Module):  # the seed model, parameters as model.Localizer's, conv as `how`
    how: str

    @nn.compact
    def __call__(self, x):
      for i, f in enumerate((16, 32, 64)):
        kernel = self.param(f"k{i}", model.KERAS_INIT, (3, 3, x.shape[-1], f))
        bias = self.param(f"b{i}", nn.initializers.zeros_init(), (f,))
        y = conv(x, kernel, bias, self.how, i == 0)
        x = model.avg_pool_2x2(nn.relu(y))
      x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
      return {"logits": nn.Dense(10)(x), "box": nn.Dense(4)(x)}

  x = jax.random.uniform(jax.random.key(0), (BATCH, CANVAS, CANVAS, 1))
  result, reference, reference_grads = {}, None, None
  for how in FORMULATIONS:
    net = Seed(how)
    params = model.init_params(jax.random.key(1), net, CANVAS)
    loss = lambda p, net=net: sum(v.sum() for v in net.apply({"params": p}, x).values())
    out = float(jax.jit(loss)(params))
    reference = out if reference is None else reference
    result[f"{how}_rel_diff"] = abs(out - reference) / max(abs(reference), 1e-9)
    grads = jax.grad(loss)(params)
    reference_grads = grads if reference_grads is None else reference_grads
    diffs = jax.tree_util.tree_map(
      lambda a, r: float(jnp.max(jnp.abs(a - r)) / (jnp.max(jnp.abs(r)) + 1e-12)),
      grads,
      reference_grads,
    )
    result[f"{how}_grad_rel_diff"] = max(jax.tree_util.tree_leaves(diffs))
    for part, fn in (("forward", jax.jit(loss)), ("gradient", jax.jit(jax.grad(loss)))):
      seconds = bench_seed._seconds_per_call(fn, params, max(3, steps // 10))
      result[f"{how}_{part}_ms"] = seconds * 1000
  return result


def pools(steps):
  """Training images/s of the seed model (its whole step, as `train_jaxloc`) with each way of
  writing its 2x2 average pools, in rounds alternating between them (best of 2 rounds):

    reshape  the mean of the reshaped 2x2 blocks (`model.avg_pool_2x2`)
    window   `lax.reduce_window` sum x 0.25: the same values, bit for bit; alone, its
             gradient on the first pool's input took half the time of `reshape`'s
    slices   the sum of 4 strided slices x 0.25 (not bit-identical: another summation order)
  """
  import jax

  from jaxloc import model

  def window(x):
    b, h, w, c = x.shape
    dims = (1, 2, 2, 1)
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, dims, "VALID") * 0.25

  def slices(x):
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return (x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]) * 0.25

  ways = {"reshape": model.avg_pool_2x2, "window": window, "slices": slices}
  return _alternating_rounds(steps, model, "avg_pool_2x2", ways)


def _gather_conv(x, kernel):
  """One matrix product over the gathered patches, XLA's gradient of it."""
  from jaxloc import model

  return model._forward(x, kernel, model._patches(x))


def _own_gradient(forward, input_gradient):
  """`forward(x, kernel)` with its own gradient: the input's `input_gradient(g, kernel)`,
  the kernel's from the patches built again from x (`model._kernel_gradient`)."""
  import jax

  from jaxloc import model

  conv = jax.custom_vjp(forward)
  conv.defvjp(
    lambda x, kernel: (forward(x, kernel), (x, kernel)),
    lambda res, g: (input_gradient(g, res[1]), model._kernel_gradient(res[0], g, res[1])[0]),
  )
  return conv


def conv_steps(steps, config=None):
  """Training images/s of the seed model (its whole step, as `train_jaxloc`; or `config`'s)
  with its 3x3 convolutions written each way, in rounds alternating between them (best of
  2 rounds); the same parameters and values (to float32 rounding) in all:

    jaxloc         `model.conv3x3_valid` (see `conv_formulations`)
    gather         one matrix product over gathered patches, XLA's gradient of it
                   (jaxloc's until 2026-11-30)
    first_grad_gather
                   `jaxloc` with the 1-channel first conv's kernel gradient from its gathered
                   [N, 9] patches and its bias gradient a sum apart (jaxloc's until
                   2026-12-01; now one [10, N] x [N, F] product of the 9 shifted input
                   planes and a row of ones)
    patches_first  `jaxloc` with the 1-channel first conv as a matrix product over its
                   patches (inner dimension 9) instead of 9 multiply-adds
  """
  import jax

  from jaxloc import model

  def patches_forward(x, kernel, bias):
    patches = model._patches(x)
    return model._forward(x, kernel, patches) + bias, (patches, kernel)

  patches_first = jax.custom_vjp(lambda x, kernel, bias: patches_forward(x, kernel, bias)[0])
  patches_first.defvjp(patches_forward, model._conv3x3_bwd)

  def first_grad_gather_bwd(residuals, g):  # the first conv's gradients from its [N, 9] patches
    x_or_patches, kernel = residuals
    if x_or_patches.ndim == 4:
      residuals = (model._patches(x_or_patches), kernel)
    return model._conv3x3_bwd(residuals, g)

  first_grad_gather = jax.custom_vjp(model.conv3x3_valid.fun)
  first_grad_gather.defvjp(model._conv3x3_fwd, first_grad_gather_bwd)
  ways = {
    "jaxloc": model.conv3x3_valid,
    "gather": lambda x, kernel, bias: _gather_conv(x, kernel) + bias,
    "patches_first": patches_first,
    "first_grad_gather": first_grad_gather,
  }
  return _alternating_rounds(steps, model, "conv3x3_valid", ways, config)


def conv_steps_multi(steps):
  """`conv_steps` with case 4's dense detector (`multi`, 128x128 scenes, batch 64), whose
  3x3 convolutions are SAME-padded and up to 128 channels wide."""
  from experiments import bench_scenes

  return conv_steps(steps, bench_scenes.multi_config("dense"))


def _alternating_rounds(steps, module, name, ways, config=None):
  """`bench_seed.train_jaxloc` images/s with `module.name` set to each of `ways` in turn,
  best of 2 rounds; `module.name` is restored after."""
  original, result = getattr(module, name), {}
  try:
    for _ in range(2):
      for way, fn in ways.items():
        setattr(module, name, fn)
        images_per_s = bench_seed.train_jaxloc(steps, config=config)["images_per_s"]
        key = f"{way}_images_per_s"
        result[key] = max(result.get(key, 0), images_per_s)
  finally:
    setattr(module, name, original)
  return result


def step_profile(steps, config=None):
  """Where the seed model's training step (or `config`'s) spends its time on this CPU: ms
  per step in each of XLA's compiled operations (its fusions and library calls, by the name
  in the compiled program), from a `jax.profiler` trace of `steps` steps, the 15 largest,
  each with its output shape and the model operation it was made from (the HLO's op_name).
  Operations XLA:CPU runs asynchronously (its own dot and convolution calls) count their
  launch only, so `listed_ms` can fall short of `step_ms`."""
  import collections
  import glob
  import gzip
  import json
  import re
  import tempfile
  import time

  import jax

  fn, (state, sums, *data), n, _ = bench_seed.compiled_steps(config)
  state, sums = fn(state, sums, *data)  # warm-up
  jax.block_until_ready(sums)
  calls = max(1, steps // n)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(calls):
      state, sums = fn(state, sums, *data)
    jax.block_until_ready(sums)
    step_ms = (time.perf_counter() - t) * 1000 / (calls * n)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  us = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      us[e["args"]["hlo_op"]] += e["dur"]
  hlo = fn.as_text()
  ops = []
  for name, total in us.most_common(15):
    m = re.search(rf"%{re.escape(name)} = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
    shape, source = (m.group(1), m.group(2).split("closed_call/")[-1]) if m else ("?", "?")
    ops.append([round(total / 1000 / (calls * n), 2), name, shape, source])
  listed = sum(total for total in us.values()) / 1000 / (calls * n)
  return {"step_ms": step_ms, "listed_ms": listed, "ops": ops}


def step_profile_multi(steps):
  """`step_profile` of case 4's dense detector (`multi`, 128x128 scenes, batch 64)."""
  from experiments import bench_scenes

  return step_profile(steps, bench_scenes.multi_config("dense"))
