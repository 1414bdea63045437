"""Pure `jax.random` synthesis of canvas batches, entirely on the device.

A canvas is a black `canvas_size` x `canvas_size` image with 28x28 MNIST digits
pasted on it. Pasting is a pair of small matrix products,
`canvas = P_y @ digit @ P_x^T`, where `P_y` [H, 28] and `P_x` [W, 28] are
placement matrices holding bilinear weights. For an unscaled digit they are
one-hot, so the pasted pixels equal the digit's pixels exactly; the same
formula resizes a digit when its size on the canvas is not 28.

The seed's protocol (one digit, offsets `xmin, ymin` uniform integers in
[0, canvas_size - 28], box = the pasted patch; see `jaxloc.boxes`) is
`sample_batch`. Batch t of a run is `sample_batch(fold_in(data_key, t), ...)`,
a function of (seed, t) alone.

Shape letters: B batch, K digits per canvas, H = W = canvas_size, D = 28.
"""

import functools
from typing import TypedDict

import jax
import jax.numpy as jnp

from jaxloc import boxes
from jaxloc.errors import UserError

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


def paste(
  digits_BxKxDxD: jax.Array,
  xy_BxKx2: jax.Array,
  size_BxK: jax.Array,
  valid_BxK: jax.Array,
  *,
  canvas_size: int,
) -> jax.Array:
  """Pastes K digits (uint8) per canvas; overlapping digits combine by maximum.

  Returns float32 images [B, H, W, 1] in [0, 1]. Slots with `valid` False are not drawn.
  """
  b, k = valid_BxK.shape
  flat = lambda a: a.reshape((b * k,) + a.shape[2:])
  p_x = placement_matrix(flat(xy_BxKx2[..., 0]), flat(size_BxK), canvas_size)
  p_y = placement_matrix(flat(xy_BxKx2[..., 1]), flat(size_BxK), canvas_size)
  digit = flat(digits_BxKxDxD).astype(jnp.float32) / 255.0
  # HIGHEST precision keeps the one-hot products exact on accelerators too.
  placed = jnp.einsum("nhi,nij,nwj->nhw", p_y, digit, p_x, precision=jax.lax.Precision.HIGHEST)
  placed = jnp.where(flat(valid_BxK)[:, None, None], placed, 0.0)
  image = placed.reshape(b, k, canvas_size, canvas_size).max(axis=1)
  return jnp.clip(image, 0.0, 1.0)[..., None]


def render(
  digits_BxDxD: jax.Array, labels_B: jax.Array, xy_Bx2: jax.Array, *, canvas_size: int
) -> Batch:
  """One unscaled digit per canvas with its top-left pixel at `xy` = (x, y)."""
  b = labels_B.shape[0]
  size = jnp.full((b, 1), DIGIT_SIZE)
  image = paste(
    digits_BxDxD[:, None], xy_Bx2[:, None], size, jnp.ones((b, 1), bool), canvas_size=canvas_size
  )
  box = boxes.patch_box(xy_Bx2[:, 0], xy_Bx2[:, 1], DIGIT_SIZE, canvas_size)
  return Batch(image=image, label=labels_B.astype(jnp.int32), box=box)


def sample_offsets(key: jax.Array, num: int, canvas_size: int) -> jax.Array:
  """Uniform integer top-left offsets (x, y) in [0, canvas_size - 28], int32 [num, 2]."""
  return jax.random.randint(key, (num, 2), 0, canvas_size - DIGIT_SIZE + 1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("batch_size", "canvas_size"))
def sample_batch(
  key: jax.Array, digits: jax.Array, labels: jax.Array, *, batch_size: int, canvas_size: int = 75
) -> Batch:
  """Pastes one random digit (drawn with replacement) per canvas at a uniform random offset."""
  key_index, key_offset = jax.random.split(key)
  index = jax.random.randint(key_index, (batch_size,), 0, labels.shape[0])
  xy = sample_offsets(key_offset, batch_size, canvas_size)
  return render(digits[index], labels[index], xy, canvas_size=canvas_size)


def validation_offsets(key: jax.Array, num: int, canvas_size: int) -> jax.Array:
  """The fixed validation layout: one offset per test digit, from a fixed key."""
  return sample_offsets(key, num, canvas_size)
