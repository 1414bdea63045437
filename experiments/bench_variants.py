"""Formulations of the seed model's training step, side by side in one process:

    JAXLOC_MNIST_DIR=../shared/data/mnist python -m experiments.bench_variants --rounds=5

Each variant swaps one function of `jaxloc.model` / `jaxloc.conv` while its program is traced
(the caches cleared before each), then the compiled programs take turns: 15 calls of 10
steps each, per round. Prints training images/s per round, the median against `base`, and
how far each variant's parameters are from `base`'s after 10 steps.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import bench_seed
from jaxloc import conv, model

_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds of turns.")
_ONLY = flags.DEFINE_list("variants", None, "Only these (base is always first).")
flags.DEFINE_string("mnist_dir", None, "IDX directory (default: $JAXLOC_MNIST_DIR).")

_kernel_gradient = conv._kernel_gradient
_SHIFTS = [(dy, dx) for dy in range(3) for dx in range(3)]


def pool_slices(x):
  """2x2 average pool as the mean of 4 strided slices."""
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) * 0.25


def backbone_crop(x, conv_features, dense_features):
  """Each conv's input cropped by the row and column its pool would drop (75 -> 74, 17 ->
  16): no pad or slice around the pools, in the forward or the gradient."""
  for features in conv_features:
    h, w = x.shape[1], x.shape[2]
    x = x[:, : h - (h - 2) % 2, : w - (w - 2) % 2]
    x = model.avg_pool_2x2(nn.relu(conv.Conv3x3(features)(x)))
  x = x.reshape(x.shape[0], -1)
  return nn.relu(nn.Dense(dense_features, kernel_init=conv.KERAS_INIT)(x))


def kernel_gradient_split(parts):
  """The 1-channel kernel gradient as `parts` batched products summed ([S,10,N/S] x
  [S,N/S,F]): the long contraction split so that threads can share it."""

  def kernel_gradient(x_or_patches, g, kernel):
    if x_or_patches.ndim == 2:
      return _kernel_gradient(x_or_patches, g, kernel)
    x, f = x_or_patches[..., 0], kernel.shape[-1]
    ho, wo = x.shape[1] - 2, x.shape[2] - 2
    planes = [x[:, dy : dy + ho, dx : dx + wo].reshape(parts, -1) for dy, dx in _SHIFTS]
    rows = jnp.stack([*planes, jnp.ones_like(planes[0])], axis=1)
    dims = (((2,), (1,)), ((0,), (0,)))
    both = jax.lax.dot_general(rows, g.reshape(parts, -1, f), dims).sum(0)
    return both[:9].reshape(kernel.shape), both[9]

  return kernel_gradient


def kernel_gradient_bias_apart(x_or_patches, g, kernel):
  """The 1-channel kernel gradient from 9 planes, the bias' as a sum of its own."""
  if x_or_patches.ndim == 2:
    return _kernel_gradient(x_or_patches, g, kernel)
  x, f = x_or_patches[..., 0], kernel.shape[-1]
  ho, wo = x.shape[1] - 2, x.shape[2] - 2
  rows = jnp.stack([x[:, dy : dy + ho, dx : dx + wo] for dy, dx in _SHIFTS]).reshape(9, -1)
  g = g.reshape(-1, f)
  return (rows @ g).reshape(kernel.shape), g.sum(axis=0)


def kernel_gradient_gather(x_or_patches, g, kernel):
  """The 1-channel kernel gradient's 10 rows (9 planes and ones) as one gather."""
  if x_or_patches.ndim == 2:
    return _kernel_gradient(x_or_patches, g, kernel)
  x, f = x_or_patches[..., 0], kernel.shape[-1]
  b, ho, wo = x.shape[0], x.shape[1] - 2, x.shape[2] - 2
  source = jnp.concatenate([x, jnp.ones_like(x)])  # [2B, H, W]: the ones row's source
  k = np.arange(10)
  dy, dx = np.where(k < 9, k // 3, 0), np.where(k < 9, k % 3, 0)
  image = np.where(k < 9, 0, b)[:, None] + np.arange(b)[None, :]  # [10, B]
  rows = source[
    image[:, :, None, None],
    dy[:, None, None, None] + np.arange(ho)[None, None, :, None],
    dx[:, None, None, None] + np.arange(wo)[None, None, None, :],
  ]
  both = rows.reshape(10, -1) @ g.reshape(-1, f)
  return both[:9].reshape(kernel.shape), both[9]


def _pre_activation(x, kernel, bias, ho, wo):
  terms = [x[:, dy : dy + ho, dx : dx + wo, None] * kernel[dy, dx, 0] for dy, dx in _SHIFTS]
  return sum(terms[1:], terms[0]) + bias


def _first_stage_fwd(x, kernel, bias):
  return first_stage(x, kernel, bias), (x, kernel, bias)


def _first_stage_parts(residuals, g_pool):
  x, kernel, bias = residuals
  b, h, w, _ = x.shape
  ho, wo, f = (h - 2) // 2 * 2, (w - 2) // 2 * 2, kernel.shape[-1]
  y = _pre_activation(x[..., 0], kernel, bias, ho, wo)  # recomputed: 9 multiply-adds
  up = jnp.broadcast_to(g_pool[:, :, None, :, None] * 0.25, (b, ho // 2, 2, wo // 2, 2, f))
  g = jnp.where(y > 0, up.reshape(b, ho, wo, f), 0.0)
  return x[..., 0], g, ho, wo


@jax.custom_vjp
def first_stage(x, kernel, bias):
  """conv0 -> relu -> pool in one function that keeps only its input for the gradient and
  recomputes the pre-activation there (9 multiply-adds of the 1-channel image)."""
  b, h, w, _ = x.shape
  ho, wo = (h - 2) // 2 * 2, (w - 2) // 2 * 2
  return model.avg_pool_2x2(nn.relu(_pre_activation(x[..., 0], kernel, bias, ho, wo)))


def _first_stage_bwd(residuals, g_pool):
  x, g, ho, wo = _first_stage_parts(residuals, g_pool)
  ones = jnp.ones_like(x[:, :ho, :wo])
  rows = jnp.stack([*[x[:, dy : dy + ho, dx : dx + wo] for dy, dx in _SHIFTS], ones])
  both = rows.reshape(10, -1) @ g.reshape(-1, g.shape[-1])
  kernel = residuals[1]
  return jnp.zeros_like(residuals[0]), both[:9].reshape(kernel.shape), both[9]


first_stage.defvjp(_first_stage_fwd, _first_stage_bwd)


@jax.custom_vjp
def first_stage_sums(x, kernel, bias):
  """`first_stage` whose kernel gradient is 9 multiply-and-sum reductions, no product."""
  return first_stage(x, kernel, bias)


def _first_stage_sums_bwd(residuals, g_pool):
  x, g, ho, wo = _first_stage_parts(residuals, g_pool)
  sums = [(x[:, dy : dy + ho, dx : dx + wo, None] * g).sum((0, 1, 2)) for dy, dx in _SHIFTS]
  kernel = residuals[1]
  return jnp.zeros_like(residuals[0]), jnp.stack(sums).reshape(kernel.shape), g.sum((0, 1, 2))


first_stage_sums.defvjp(_first_stage_fwd, _first_stage_sums_bwd)


def backbone_first(fn, remat=False):
  """The seed backbone whose first stage (conv0, relu, pool) is `fn(x, kernel, bias)`, with
  the same parameters; remat: the stage under jax.checkpoint."""

  class First(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
      kernel = self.param("kernel", conv.KERAS_INIT, (3, 3, 1, self.features))
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
      return (jax.checkpoint(fn) if remat else fn)(x, kernel, bias)

  def backbone(x, conv_features, dense_features):
    for i, features in enumerate(conv_features):
      if i == 0:
        x = First(features, name="Conv3x3_0")(x)
      else:
        x = model.avg_pool_2x2(nn.relu(conv.Conv3x3(features, name=f"Conv3x3_{i}")(x)))
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(dense_features, kernel_init=conv.KERAS_INIT, name="Dense_0")(x))

  return backbone


def _conv_relu_pool(x, kernel, bias):
  return model.avg_pool_2x2(nn.relu(conv.conv3x3_valid(x, kernel, bias)))


VARIANTS = {
  "base": {},
  "pool_slices": {(model, "avg_pool_2x2"): pool_slices},
  "crop": {(model, "_backbone"): backbone_crop},
  "kernel_grad_split4": {(conv, "_kernel_gradient"): kernel_gradient_split(4)},
  "kernel_grad_bias_apart": {(conv, "_kernel_gradient"): kernel_gradient_bias_apart},
  "kernel_grad_gather": {(conv, "_kernel_gradient"): kernel_gradient_gather},
  "first_stage_remat": {(model, "_backbone"): backbone_first(_conv_relu_pool, remat=True)},
  "first_stage_recompute": {(model, "_backbone"): backbone_first(first_stage)},
  "first_stage_sums": {(model, "_backbone"): backbone_first(first_stage_sums)},
}


def _compile(patches):
  saved = {target: getattr(*target) for target in patches}
  for (module, name), fn in patches.items():
    setattr(module, name, fn)
  try:
    jax.clear_caches()  # a jitted function's trace does not see a swapped global
    return bench_seed.compiled_steps(steps_per_call=10)
  finally:
    for (module, name), fn in saved.items():
      setattr(module, name, fn)


def main(argv):
  names = ["base", *[n for n in (_ONLY.value or VARIANTS) if n != "base"]]
  programs = {name: _compile(VARIANTS[name]) for name in names}
  carry, rates = {}, {name: [] for name in names}
  for name, (fn, args, _, _) in programs.items():
    carry[name] = jax.block_until_ready(fn(*args))
  flat = lambda name: np.concatenate([np.ravel(p) for p in jax.tree.leaves(carry[name][0].params)])
  for name in names:
    print(f"{name}: max |params - base's| after {programs[name][2]} steps", end=" ")
    print(f"{float(np.abs(flat(name) - flat('base')).max()):.2g}")
  for _ in range(_ROUNDS.value):
    for name, (fn, args, n, _) in programs.items():
      state, sums = carry[name]
      t = time.perf_counter()
      for _ in range(15):
        state, sums = fn(state, sums, *args[2:])
      jax.block_until_ready(sums)
      rates[name].append(15 * n * 64 / (time.perf_counter() - t))
      carry[name] = (state, sums)
  base = np.median(rates["base"])
  print("| variant | training images/s, per round | median against base |")
  print("| --- | --- | --- |")
  for name, r in rates.items():
    print(f"| {name} | {' / '.join(f'{v:,.0f}' for v in r)} | {np.median(r) / base:.2f}x |")


if __name__ == "__main__":
  app.run(main)
