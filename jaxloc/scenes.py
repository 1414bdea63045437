"""Scenes: up to K digits per canvas, for the presence / count / detection cases, as
fixed-shape slots with a validity mask (`Scene`): synthesised on the device
(`sample_scene`) or read from a stored set (`stored_scene`, `stored_training_batch`).

Shape letters: B batch, K slots, H = W = canvas_size, D = 28, N digits.
"""

import functools
from typing import TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from jaxloc import boxes
from jaxloc.canvas import (
  DIGIT_SIZE,
  check_canvas_size,
  combine,
  ink_box,
  ink_extent,
  paste_unscaled,
  place_digits,
)
from jaxloc.errors import UserError
from jaxloc.stream import stream_index


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
  scaled = size_range != (DIGIT_SIZE, DIGIT_SIZE)
  image, box = _draw(chosen, xy, size, placed, ext, canvas_size, box_type, paste_mode, scaled)
  valid = placed[:, :max_objects]
  box = jnp.where(valid[..., None], box[:, :max_objects], 0.0)
  label = jnp.where(valid, labels[index[:, :max_objects]], 0)
  return _left_to_right(image, label, box, valid)


def _draw(chosen, xy, size, placed, ext, canvas_size: int, box_type, paste_mode, scaled: bool):
  """The canvases [B, H, W, 1] of the placed digits and each digit's box [B, K+1, 4]
  (normalised) of `box_type`; `ext` is each digit's ink extent in canvas pixels."""
  if box_type == "ink" or paste_mode != "max" or scaled:
    digit_canvases = place_digits(chosen, xy, size, placed, canvas_size=canvas_size)
    image = combine(digit_canvases, paste_mode)
  else:
    image = paste_unscaled(chosen, xy, placed, canvas_size=canvas_size)
  if box_type == "ink":
    return image, ink_box(digit_canvases) / canvas_size
  if box_type == "tight":
    return image, (jnp.concatenate([xy, xy], axis=-1) + ext) / canvas_size
  return image, boxes.patch_box(xy[..., 0], xy[..., 1], size, canvas_size)  # the pasted square


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
  placed [B, K+1]. The slots are a `fori_loop` over offsets drawn before it: one loop body
  to compile, whatever the number of slots."""
  batch_size, k_slots = size.shape
  uniform = lambda k: jax.random.uniform(k, (batch_size, tries, 2))
  u = jax.vmap(uniform)(jax.random.split(key, k_slots))  # [K+1, B, T, 2]: slot j's key j
  span = canvas_size - size.T + 1  # [K+1, B]: offsets 0 .. canvas - size
  cands = jnp.floor(u * span[:, :, None, None]).astype(jnp.int32)

  def slot(j, carry):
    xy_all, placed, earlier_box = carry  # earlier_box: what later digits are tested against
    cand = cands[j]  # [B, T, 2]
    cand_box = boxes.patch_box(cand[..., 0], cand[..., 1], size[:, j, None], canvas_size)
    prev = jnp.repeat(earlier_box[:, None, :, :], tries, axis=1)  # [B, T, K, 4]
    ious = boxes.iou(jnp.repeat(cand_box[:, :, None, :], k_slots, axis=2), prev)
    ok = jnp.all((ious <= max_overlap) | ~placed[:, None, :], axis=-1)  # [B, T]
    first = jnp.argmax(ok, axis=1)  # slot 0 (nothing placed yet): every try fits, the first
    found = jnp.any(ok, axis=1) & wanted[:, j]
    xy = jnp.take_along_axis(cand, first[:, None, None], axis=1)[:, 0]
    if ext is None:
      box = jnp.take_along_axis(cand_box, first[:, None, None], 1)[:, 0]
    else:
      box = (jnp.concatenate([xy, xy], axis=-1) + ext[:, j]) / canvas_size
    box = jnp.where(found[:, None], box, 0.0)
    return xy_all.at[:, j].set(xy), placed.at[:, j].set(found), earlier_box.at[:, j].set(box)

  init = (
    jnp.zeros((batch_size, k_slots, 2), jnp.int32),
    jnp.zeros((batch_size, k_slots), bool),
    jnp.zeros((batch_size, k_slots, 4)),
  )
  xy_all, placed, _ = jax.lax.fori_loop(0, k_slots, slot, init)
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
