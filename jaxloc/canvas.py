"""Pure `jax.random` synthesis of canvas batches, entirely on the device.

A canvas is a black `canvas_size` x `canvas_size` image with 28x28 MNIST digits
pasted on it. A digit kept at 28x28 is copied in (`paste_unscaled`). A resized
digit is pasted with a pair of small matrix products,
`canvas = P_y @ digit @ P_x^T`, where `P_y` [H, 28] and `P_x` [W, 28] are
placement matrices holding bilinear weights (`paste`; for a size of 28 they would be
one-hot and give the digit's pixels exactly, which the tests check against
`paste_unscaled`).

The seed's protocol (one digit, offsets `xmin, ymin` uniform integers in
[0, canvas_size - 28], box = the pasted patch; see `jaxloc.boxes`) is
`sample_batch` (digits drawn with replacement, for one-off batches) and
`training_batch`, which reads the training digits the way the seed's tf.data pipeline
does (a fresh permutation per pass). Batch t of a run is
`training_batch(data_key, t, ...)`, a function of (seed, t) alone.

Shape letters: B batch, K digits per canvas, H = W = canvas_size, D = 28.
"""

import functools
from typing import TypedDict

import jax
import jax.numpy as jnp
import numpy as np

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


def paste(
  digits_BxKxDxD: jax.Array,
  xy_BxKx2: jax.Array,
  size_BxK: jax.Array,
  valid_BxK: jax.Array,
  *,
  canvas_size: int,
  mode: str = "max",
) -> jax.Array:
  """Pastes K resized digits (uint8) per canvas, overlaps combined by `mode` (`combine`).

  Returns float32 images [B, H, W, 1] in [0, 1]. Slots with `valid` False are not drawn.
  """
  placed = place_digits(digits_BxKxDxD, xy_BxKx2, size_BxK, valid_BxK, canvas_size=canvas_size)
  return combine(placed, mode)


def ink_box(placed_BxKxHxW: jax.Array) -> jax.Array:
  """The pixel box of each placed digit's ink (pixels > 0), as the MNIST-detection generator
  computes it on the resized digit: int32 [B, K, 4] xyxy in canvas pixels, max exclusive
  ((0, 0, W, H) for a slot without ink)."""
  b, k, h, w = placed_BxKxHxW.shape
  return _extent(placed_BxKxHxW.reshape(b * k, h, w) > 0).reshape(b, k, 4)


def paste_unscaled(
  digits_BxKxDxD: jax.Array, xy_BxKx2: jax.Array, valid_BxK: jax.Array, *, canvas_size: int
) -> jax.Array:
  """`paste` for digits kept at 28x28: a copy (dynamic_update_slice) per digit instead of
  two matrix products; same result, several times faster on CPU (`experiments/benchmark`)."""
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
def sample_batch(
  key: jax.Array, digits: jax.Array, labels: jax.Array, *, batch_size: int, canvas_size: int = 75
) -> Batch:
  """Pastes one random digit (drawn with replacement) per canvas at a uniform random offset."""
  key_index, key_offset = jax.random.split(key)
  index = jax.random.randint(key_index, (batch_size,), 0, labels.shape[0])
  xy = sample_offsets(key_offset, batch_size, canvas_size)
  return render(digits[index], labels[index], xy, canvas_size=canvas_size)


def _mix32(x: jax.Array) -> jax.Array:
  """A 32-bit integer hash (Wellons' "lowbias32"): cheap, elementwise, well mixed."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


@functools.partial(jax.jit, static_argnames=("num",))
def permute_index(key: jax.Array, i: jax.Array, num: int) -> jax.Array:
  """Elements `i` (any shape) of a pseudo-random permutation of [0, num) chosen by `key`,
  without building the permutation: a 4-round Feistel network on the smallest even number
  of bits that holds `num`, round i hashing the right half with round key i (from `key`),
  walked until the result falls inside [0, num) ("cycle walking", a few rounds at most)."""
  half = max(1, (int(num - 1).bit_length() + 1) // 2)
  mask = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (4,), jnp.uint32)

  def feistel(x):
    left, right = x >> half, x & mask
    for r in range(4):
      left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half) | right

  outside = lambda x: jnp.any(x >= num)
  walk = lambda x: jnp.where(x >= num, feistel(x), x)
  return jax.lax.while_loop(outside, walk, feistel(jnp.asarray(i, jnp.uint32))).astype(jnp.int32)


def stream_index(key: jax.Array, step: jax.Array, batch_size: int, num: int) -> jax.Array:
  """Example indices int32 [batch_size] of batch `step` of a stream that reads all `num`
  examples in passes, pass p in the order `permute_index(fold_in(key, p), ., num)`, with
  batches running on across the end of a pass: the seed's tf.data
  `shuffle(buffer_size >= num).repeat().batch(batch_size)`. Every example is seen once
  per pass. (int32 positions: fine up to step * batch_size < 2**31.)"""
  position = step * batch_size + jnp.arange(batch_size)
  first_pass = step * batch_size // num
  passes = batch_size // num + 2  # how many passes one batch can touch
  orders = [
    permute_index(jax.random.fold_in(key, first_pass + p), position % num, num)
    for p in range(passes)
  ]
  return jnp.choose(position // num - first_pass, orders, mode="clip")


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


# --- Scenes: up to K digits per canvas, for the presence / count / detection cases ---


class Scene(TypedDict):
  image: jax.Array  # float32 [B, H, W, 1] in [0, 1]
  label: jax.Array  # int32 [B, K], class of each slot (0 where not valid)
  box: jax.Array  # float32 [B, K, 4], normalised xyxy (zeros where not valid)
  valid: jax.Array  # bool [B, K], slot holds an object to detect
  count: jax.Array  # int32 [B], number of valid slots


def check_scene(canvas_size: int, max_objects: int, max_size: int, max_overlap: float) -> None:
  """Rejects layouts that cannot be placed: digits larger than the canvas, or K digits
  that cannot sit on it without overlap."""
  check_canvas_size(canvas_size)
  if max_size > canvas_size:
    raise UserError(f"digits of {max_size}px do not fit a {canvas_size}px canvas")
  per_side = canvas_size // max_size
  if max_overlap <= 0.0 and per_side * per_side < max_objects:
    need = int(np.ceil(np.sqrt(max_objects))) * max_size
    raise UserError(
      f"{max_objects} digits of up to {max_size}px cannot be placed without overlap on a "
      f"{canvas_size}px canvas (at most {per_side * per_side} fit); use canvas_size >= {need}, "
      "fewer max_objects, smaller digits or allow max_overlap > 0"
    )


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


@functools.partial(
  jax.jit,
  static_argnames=(
    "batch_size",
    "canvas_size",
    "max_objects",
    "count_probs",
    "target_class",
    "distractor_prob",
    "size_range",
    "box_type",
    "paste_mode",
    "max_overlap",
    "tries",
  ),
)
def sample_scene(
  key: jax.Array,
  digits: jax.Array,
  labels: jax.Array,
  *,
  batch_size: int,
  canvas_size: int,
  max_objects: int,
  count_probs: tuple[float, ...],
  target_class: int = -1,
  distractor_prob: float = 0.0,
  size_range: tuple[int, int] = (DIGIT_SIZE, DIGIT_SIZE),
  box_type: str = "patch",
  paste_mode: str = "max",
  max_overlap: float = 0.0,
  tries: int = 32,
) -> Scene:
  """Canvases with a random number of digits, as fixed-shape slots with a validity mask.

  - The count n is drawn from `count_probs` (entry i: probability of i objects, i <= K).
  - Objects are digits of any class, or only of `target_class` when it is >= 0; then an
    empty canvas gets one digit of another class (a distractor, not a target) with
    probability `distractor_prob`.
  - Each digit is resized to an integer side in `size_range` (inclusive) and placed at
    a uniform offset; a placement whose IoU with an earlier digit exceeds
    `max_overlap` is redrawn, up to `tries` times, after which that digit is dropped
    (so overlap limits always hold; `check_scene` rejects layouts where this is not rare).
    With `box_type` "ink" a placement is tested against the earlier digits' ink boxes (the
    28x28 ink extent scaled to the digit's size), as the MNIST-detection generator does.
  - Overlapping ink combines by `paste_mode` (`combine`: "max", or "add" clipped at 1).
  - Boxes (`box_type`): "patch", the pasted square (the seed's box); "tight", the digit's
    28x28 ink extent scaled to its size (fractional pixels); "ink", the whole pixels > 0 of
    the resized digit on the canvas (the generator's boxes).
  - Targets are ordered left to right by box xmin (ties: ymin); empty slots come last
    with box and label zero. The order is therefore visible in the image and carries
    no hidden information; the losses match slots to targets as a set anyway.
  """
  k_slots = max_objects + 1  # the last slot holds the distractor, never a target
  keys = jax.random.split(key, 6)
  count = jax.random.categorical(
    keys[0], jnp.log(jnp.asarray(count_probs, jnp.float32)), shape=(batch_size,)
  )
  index, wanted = _choose_digits(
    keys[1:4], labels, count, k_slots, target_class=target_class, distractor_prob=distractor_prob
  )
  size = jax.random.randint(keys[4], (batch_size, k_slots), size_range[0], size_range[1] + 1)
  chosen = digits[index]  # [B, K+1, 28, 28]
  ext = ink_extent(chosen.reshape(-1, DIGIT_SIZE, DIGIT_SIZE)).reshape(batch_size, k_slots, 4)
  ext = ext * (size / DIGIT_SIZE)[..., None]  # the ink extent in canvas pixels, from the offset
  overlap_ext = ext if box_type == "ink" else None
  xy, placed = _place(keys[5], size, wanted, canvas_size, max_overlap, tries, overlap_ext)
  if box_type == "ink" or paste_mode != "max" or size_range != (DIGIT_SIZE, DIGIT_SIZE):
    digit_canvases = place_digits(chosen, xy, size, placed, canvas_size=canvas_size)
    image = combine(digit_canvases, paste_mode)
  else:
    image = paste_unscaled(chosen, xy, placed, canvas_size=canvas_size)
  if box_type == "ink":
    box = ink_box(digit_canvases) / canvas_size
  elif box_type == "tight":
    box = (jnp.concatenate([xy, xy], axis=-1) + ext) / canvas_size
  else:  # the pasted square
    box = boxes.patch_box(xy[..., 0], xy[..., 1], size, canvas_size)
  valid = placed[:, :max_objects]
  box = jnp.where(valid[..., None], box[:, :max_objects], 0.0)
  label = jnp.where(valid, labels[index[:, :max_objects]], 0)
  return _left_to_right(image, label, box, valid)


def _choose_digits(keys, labels, count, k_slots: int, *, target_class: int, distractor_prob):
  """Which digit goes in each of the K + 1 slots ([B, K+1] indices into `labels`), and which
  slots are wanted: the first `count`, and the last one for a distractor (`target_class`
  >= 0, an empty canvas, probability `distractor_prob`)."""
  batch_size = count.shape[0]
  is_target = labels == target_class if target_class >= 0 else jnp.ones_like(labels, bool)
  pick = lambda k, allowed: jax.random.categorical(
    k, jnp.where(allowed, 0.0, -jnp.inf)[None, :], shape=(batch_size, k_slots)
  )
  index = pick(keys[0], is_target)
  if target_class >= 0:
    index = index.at[:, -1].set(pick(keys[1], ~is_target)[:, -1])
  distractor = (count == 0) & jax.random.bernoulli(keys[2], distractor_prob, (batch_size,))
  wanted = jnp.arange(k_slots)[None, :] < count[:, None]
  wanted = wanted.at[:, -1].set(distractor if target_class >= 0 else False)
  return index, wanted


def _place(key, size, wanted, canvas_size: int, max_overlap: float, tries: int, ext=None):
  """Sequential placement with rejection: slot j tries `tries` offsets and keeps the first
  whose patch overlaps the digits placed before by IoU <= max_overlap (none fits: the slot
  stays empty). A digit placed before counts as its patch, or, given `ext` [B, K+1, 4] (ink
  extents from the offset, pixels), as its ink box. Returns offsets xy [B, K+1, 2] and
  placed [B, K+1]."""
  batch_size, k_slots = size.shape
  xy_keys = jax.random.split(key, k_slots)
  earlier_box = jnp.zeros((batch_size, k_slots, 4))  # what later digits are tested against
  placed = jnp.zeros((batch_size, k_slots), bool)
  xy_all = jnp.zeros((batch_size, k_slots, 2), jnp.int32)
  for j in range(k_slots):
    span = canvas_size - size[:, j] + 1  # offsets 0 .. canvas - size
    u = jax.random.uniform(xy_keys[j], (batch_size, tries, 2))
    cand = jnp.floor(u * span[:, None, None]).astype(jnp.int32)
    cand_box = boxes.patch_box(cand[..., 0], cand[..., 1], size[:, j, None], canvas_size)
    if j == 0:  # nothing placed yet: the first try fits (and XLA has no constant to fold)
      first, found = jnp.zeros((batch_size,), jnp.int32), wanted[:, 0]
    else:
      prev = jnp.repeat(earlier_box[:, None, :, :], tries, axis=1)  # [B, T, K, 4]
      ious = boxes.iou(jnp.repeat(cand_box[:, :, None, :], k_slots, axis=2), prev)
      ok = jnp.all((ious <= max_overlap) | ~placed[:, None, :], axis=-1)  # [B, T]
      first = jnp.argmax(ok, axis=1)
      found = jnp.any(ok, axis=1) & wanted[:, j]
    xy = jnp.take_along_axis(cand, first[:, None, None], axis=1)[:, 0]
    xy_all = xy_all.at[:, j].set(xy)
    placed = placed.at[:, j].set(found)
    if ext is None:
      box = jnp.take_along_axis(cand_box, first[:, None, None], 1)[:, 0]
    else:
      box = (jnp.concatenate([xy, xy], axis=-1) + ext[:, j]) / canvas_size
    earlier_box = earlier_box.at[:, j].set(jnp.where(found[:, None], box, 0.0))
  return xy_all, placed


def stored_scene(data: dict, index: jax.Array) -> Scene:
  """The scenes `index` of a stored set (`jaxloc.datasets` arrays on the device: images
  uint8 [N, H, W], box, label, valid [N, K, ...]) as a `Scene`."""
  valid = data["valid"][index]
  return Scene(
    image=(data["images"][index].astype(jnp.float32) / 255.0)[..., None],
    label=data["label"][index],
    box=data["box"][index],
    valid=valid,
    count=jnp.sum(valid, axis=1).astype(jnp.int32),
  )


@functools.partial(jax.jit, static_argnames=("batch_size",))
def stored_training_batch(data_key: jax.Array, step: jax.Array, data: dict, *, batch_size: int):
  """Batch `step` of a run on a stored set: its scenes in `stream_index` order (each once
  per pass, a fresh keyed order every pass), as `training_batch` reads digits. A function
  of (data_key, step) alone, so resuming a run gives the same batches."""
  return stored_scene(data, stream_index(data_key, step, batch_size, data["images"].shape[0]))


def _left_to_right(image, label, box, valid) -> Scene:
  """The scene with its slots ordered: valid first, left to right (xmin, then ymin)."""
  sort_key = jnp.where(valid, box[..., 0] + box[..., 1] * 1e-4, 1e9)  # ymin breaks ties
  order = jnp.argsort(sort_key, axis=1)
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1)
  return Scene(
    image=image,
    label=take(label).astype(jnp.int32),
    box=take(box),
    valid=take(valid),
    count=jnp.sum(valid, axis=1).astype(jnp.int32),
  )
