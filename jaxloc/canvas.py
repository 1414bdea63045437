"""Pure `jax.random` synthesis of canvas batches, entirely on the device.

A canvas is a black `canvas_size` x `canvas_size` image with 28x28 MNIST digits
pasted on it. A digit kept at 28x28 is copied in (`paste_unscaled`). A resized
digit is pasted with a pair of small matrix products,
`canvas = P_y @ digit @ P_x^T`, where `P_y` [H, 28] and `P_x` [W, 28] are
placement matrices holding bilinear weights (`place_digits`, overlaps joined by `combine`;
for a size of 28 they are one-hot and give the digit's pixels exactly, which the tests
check against `paste_unscaled`).

The seed's protocol (one digit, offsets `xmin, ymin` uniform integers in
[0, canvas_size - 28], box = the pasted patch; see `jaxloc.boxes`) is `training_batch`,
which reads the training digits the way the seed's tf.data pipeline does (a fresh
permutation per pass, `jaxloc.stream`). Batch t of a run is
`training_batch(data_key, t, ...)`, a function of (seed, t) alone.

Shape letters: B batch, K digits per canvas, H = W = canvas_size, D = 28.
"""

import functools
from typing import TypedDict

import jax
import jax.numpy as jnp

from jaxloc import boxes
from jaxloc.errors import UserError
from jaxloc.stream import stream_index

DIGIT_SIZE = 28


class Batch(TypedDict):
  image: jax.Array  # float32 [B, H, W, 1] in [0, 1]
  label: jax.Array  # int32 [B]
  box: jax.Array  # float32 [B, 4], normalised xyxy (jaxloc.boxes)


def check_canvas_size(canvas_size: int) -> None:
  if canvas_size < DIGIT_SIZE:
    raise UserError(
      f"canvas_size={canvas_size} is smaller than a {DIGIT_SIZE}x{DIGIT_SIZE} digit; "
      f"use --config.canvas_size={DIGIT_SIZE} or more"
    )


def placement_matrix(offset_B: jax.Array, size_B: jax.Array, canvas_size: int) -> jax.Array:
  """Weights [B, canvas_size, 28] mapping digit pixels to canvas pixels along one axis.

  Canvas pixel i in [offset, offset + size) samples the digit at the continuous
  coordinate (i - offset + 0.5) * 28 / size - 0.5 with a triangle (bilinear) kernel;
  for size == 28 that is exactly the one-hot shift i = offset + j.
  """
  i = jnp.arange(canvas_size, dtype=jnp.float32)[None, :, None]
  j = jnp.arange(DIGIT_SIZE, dtype=jnp.float32)[None, None, :]
  offset = offset_B.astype(jnp.float32)[:, None, None]
  size = size_B.astype(jnp.float32)[:, None, None]
  src = (i - offset + 0.5) * (DIGIT_SIZE / size) - 0.5
  inside = (i >= offset) & (i < offset + size)
  return jnp.where(inside, jnp.maximum(1.0 - jnp.abs(src - j), 0.0), 0.0)


def place_digits(
  digits_BxKxDxD: jax.Array,
  xy_BxKx2: jax.Array,
  size_BxK: jax.Array,
  valid_BxK: jax.Array,
  *,
  canvas_size: int,
) -> jax.Array:
  """Each of K digits (uint8) per canvas resized to its `size` and placed on a canvas of its
  own: float32 [B, K, H, W] in [0, 1]. Slots with `valid` False are all zero."""
  b, k = valid_BxK.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  p_x = placement_matrix(flat(xy_BxKx2[..., 0]), flat(size_BxK), canvas_size)
  p_y = placement_matrix(flat(xy_BxKx2[..., 1]), flat(size_BxK), canvas_size)
  digit = flat(digits_BxKxDxD).astype(jnp.float32) / 255.0
  # HIGHEST precision keeps the one-hot products exact on accelerators too.
  placed = jnp.einsum("nhi,nij,nwj->nhw", p_y, digit, p_x, precision=jax.lax.Precision.HIGHEST)
  placed = jnp.where(flat(valid_BxK)[:, None, None], placed, 0.0)
  return placed.reshape(b, k, canvas_size, canvas_size)


PASTE_MODES = ("max", "add")


def combine(placed_BxKxHxW: jax.Array, mode: str = "max") -> jax.Array:
  """The canvas [B, H, W, 1] of placed digits: where digits overlap, the brighter pixel
  (`max`) or the sum clipped at 1 (`add`: the MNIST-detection generator's ink)."""
  if mode not in PASTE_MODES:
    raise ValueError(f"paste mode {mode!r}: use one of {PASTE_MODES}")
  image = placed_BxKxHxW.max(axis=1) if mode == "max" else placed_BxKxHxW.sum(axis=1)
  return jnp.clip(image, 0.0, 1.0)[..., None]


def ink_box(placed_BxKxHxW: jax.Array) -> jax.Array:
  """The pixel box of each placed digit's ink (pixels > 0), as the MNIST-detection generator
  computes it on the resized digit: int32 [B, K, 4] xyxy in canvas pixels, max exclusive
  ((0, 0, W, H) for a slot without ink)."""
  b, k, h, w = placed_BxKxHxW.shape
  return _extent(placed_BxKxHxW.reshape(b * k, h, w) > 0).reshape(b, k, 4)


def paste_unscaled(
  digits_BxKxDxD: jax.Array, xy_BxKx2: jax.Array, valid_BxK: jax.Array, *, canvas_size: int
) -> jax.Array:
  """`combine(place_digits(...))` for digits kept at 28x28: a copy (dynamic_update_slice)
  per digit instead of two matrix products; same result, several times faster on CPU."""
  zeros = jnp.zeros((canvas_size, canvas_size), digits_BxKxDxD.dtype)
  put = lambda digit, xy: jax.lax.dynamic_update_slice(zeros, digit, (xy[1], xy[0]))
  placed = jax.vmap(jax.vmap(put))(digits_BxKxDxD, xy_BxKx2)  # [B, K, H, W]
  image = jnp.where(valid_BxK[..., None, None], placed, 0).max(axis=1)
  return (image.astype(jnp.float32) / 255.0)[..., None]


def render(
  digits_BxDxD: jax.Array, labels_B: jax.Array, xy_Bx2: jax.Array, *, canvas_size: int
) -> Batch:
  """One unscaled digit per canvas with its top-left pixel at `xy` = (x, y)."""
  valid = jnp.ones((labels_B.shape[0], 1), bool)
  image = paste_unscaled(digits_BxDxD[:, None], xy_Bx2[:, None], valid, canvas_size=canvas_size)
  box = boxes.patch_box(xy_Bx2[:, 0], xy_Bx2[:, 1], DIGIT_SIZE, canvas_size)
  return Batch(image=image, label=labels_B.astype(jnp.int32), box=box)


def sample_offsets(key: jax.Array, num: int, canvas_size: int) -> jax.Array:
  """Uniform integer top-left offsets (x, y) in [0, canvas_size - 28], int32 [num, 2]."""
  return jax.random.randint(key, (num, 2), 0, canvas_size - DIGIT_SIZE + 1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("batch_size", "canvas_size"))
def training_batch(
  data_key: jax.Array,
  step: jax.Array,
  digits: jax.Array,
  labels: jax.Array,
  *,
  batch_size: int,
  canvas_size: int = 75,
) -> Batch:
  """Batch `step` of a training run: digits in `stream_index` order (each digit once per
  pass, as the seed's pipeline reads them), each at a fresh uniform offset drawn from
  `fold_in(offset_key, step)`. A function of (data_key, step) alone."""
  order_key, offset_key = jax.random.split(data_key)
  index = stream_index(order_key, step, batch_size, labels.shape[0])
  xy = sample_offsets(jax.random.fold_in(offset_key, step), batch_size, canvas_size)
  return render(digits[index], labels[index], xy, canvas_size=canvas_size)


def validation_offsets(key: jax.Array, num: int, canvas_size: int) -> jax.Array:
  """The fixed validation layout: one offset per test digit, from a fixed key."""
  return sample_offsets(key, num, canvas_size)


def _extent(ink_NxHxW: jax.Array) -> jax.Array:
  """Tight box of the True pixels of each mask: int32 [N, 4] xyxy (max exclusive); the whole
  mask (0, 0, W, H) where nothing is True."""
  n, h, w = ink_NxHxW.shape
  cols, rows = ink_NxHxW.any(axis=1), ink_NxHxW.any(axis=2)
  first = lambda m, size: jnp.min(jnp.where(m, jnp.arange(size)[None, :], size), axis=1)
  last = lambda m: jnp.max(jnp.where(m, jnp.arange(m.shape[1])[None, :], -1), axis=1) + 1
  empty = ~cols.any(axis=1)
  box = jnp.stack([first(cols, w), first(rows, h), last(cols), last(rows)], axis=-1)
  return jnp.where(empty[:, None], jnp.array([0, 0, w, h]), box).astype(jnp.int32)


def ink_extent(digits_NxDxD: jax.Array) -> jax.Array:
  """Tight ink box of each 28x28 digit in its own pixels: int32 [N, 4] xyxy (xmax exclusive)."""
  return _extent(digits_NxDxD > 0)
