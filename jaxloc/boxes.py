"""THE box convention of jaxloc, conversions between box formats, and IoU.

Convention (used by every module): a box is 4 numbers `(xmin, ymin, xmax, ymax)`
normalised by the canvas size, so a box inside the canvas lies in [0, 1]. `x`
runs along image columns (width), `y` along rows (height). By default the box is
the seed's *patch box*: the full 28x28 square that was pasted, i.e. for a digit
pasted with its top-left pixel at column `xmin_px`, row `ymin_px`:

    box = (xmin_px, ymin_px, xmin_px + 28, ymin_px + 28) / canvas_size

so `xmax` is exclusive in pixel terms (pixel columns xmin_px .. xmin_px+27 are
covered). Other formats exist only at the edges (plots, COCO JSON) and are
reached through the explicit functions below, each with a round-trip test.

Shape letters: B batch, K object slots, N boxes. `area`, `iou`, `pairwise_iou` and the format
conversions take numpy arrays too (and then compute in numpy, in the arrays' dtype):
the host-side scoring (AP, COCO files) uses the same functions as the jitted code.
"""

import jax
import jax.numpy as jnp
import numpy as np

# Index of each coordinate in the last axis of a box array.
XMIN, YMIN, XMAX, YMAX = 0, 1, 2, 3


def patch_box(xmin_px: jax.Array, ymin_px: jax.Array, size_px, canvas_size: int) -> jax.Array:
  """Normalised xyxy box of a `size_px` square pasted at pixel offset (xmin_px, ymin_px)."""
  xmin = jnp.asarray(xmin_px, jnp.float32)
  ymin = jnp.asarray(ymin_px, jnp.float32)
  size = jnp.asarray(size_px, jnp.float32)
  return jnp.stack([xmin, ymin, xmin + size, ymin + size], axis=-1) / canvas_size


def _xp(*arrays):
  """numpy when every argument is a numpy array, else jax.numpy."""
  return np if all(isinstance(a, np.ndarray) for a in arrays) else jnp


def area(box_Nx4: jax.Array) -> jax.Array:
  """Area of xyxy boxes (zero for degenerate boxes)."""
  xp = _xp(box_Nx4)
  w = xp.maximum(box_Nx4[..., XMAX] - box_Nx4[..., XMIN], 0.0)
  h = xp.maximum(box_Nx4[..., YMAX] - box_Nx4[..., YMIN], 0.0)
  return w * h


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise intersection over union of xyxy boxes `a[..., 4]` and `b[..., 4]`.

  `a` and `b` must have the same shape (no silent broadcasting). Predicted boxes
  with xmax < xmin count as empty. Two empty boxes have IoU 0.
  """
  if a.shape != b.shape:
    raise ValueError(f"iou needs boxes of one shape, got {a.shape} and {b.shape}")
  xp = _xp(a, b)
  inter, union = _intersection_union(a, b)
  return xp.where(union > 0, inter / xp.where(union > 0, union, 1.0), 0.0)


def _intersection_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Elementwise areas of the intersection and of the union of xyxy boxes."""
  xp = _xp(a, b)
  ix = xp.maximum(
    xp.minimum(a[..., XMAX], b[..., XMAX]) - xp.maximum(a[..., XMIN], b[..., XMIN]), 0.0
  )
  iy = xp.maximum(
    xp.minimum(a[..., YMAX], b[..., YMAX]) - xp.maximum(a[..., YMIN], b[..., YMIN]), 0.0
  )
  inter = ix * iy
  return inter, area(a) + area(b) - inter


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise generalized IoU (Rezatofighi et al. 2019) of xyxy boxes of one shape: IoU
  minus the share of the smallest box enclosing both that neither covers; in [-1, 1]."""
  xp = _xp(a, b)
  inter, union = _intersection_union(a, b)
  hull = area(
    xp.concatenate([xp.minimum(a[..., :2], b[..., :2]), xp.maximum(a[..., 2:], b[..., 2:])], -1)
  )
  safe = lambda d: xp.where(d > 0, d, 1.0)
  return xp.where(union > 0, inter / safe(union), 0.0) - xp.where(
    hull > 0, (hull - union) / safe(hull), 0.0
  )


def pairwise_iou(a_Nx4: jax.Array, b_Mx4: jax.Array) -> jax.Array:
  """IoU of every box in `a` [..., N, 4] with every box in `b` [..., M, 4] -> [..., N, M]."""
  xp, n, m = _xp(a_Nx4, b_Mx4), a_Nx4.shape[-2], b_Mx4.shape[-2]
  a = xp.repeat(a_Nx4[..., :, None, :], m, axis=-2)
  b = xp.repeat(b_Mx4[..., None, :, :], n, axis=-3)
  return iou(a, b)


def xyxy_to_xywh(box: jax.Array) -> jax.Array:
  """(xmin, ymin, xmax, ymax) -> (xmin, ymin, width, height); the COCO format."""
  return _xp(box).concatenate([box[..., :2], box[..., 2:] - box[..., :2]], axis=-1)


def xywh_to_xyxy(box: jax.Array) -> jax.Array:
  """(xmin, ymin, width, height) -> (xmin, ymin, xmax, ymax)."""
  return _xp(box).concatenate([box[..., :2], box[..., :2] + box[..., 2:]], axis=-1)


def xyxy_to_cxcywh(box: jax.Array) -> jax.Array:
  """(xmin, ymin, xmax, ymax) -> (centre x, centre y, width, height)."""
  return jnp.concatenate([(box[..., :2] + box[..., 2:]) / 2, box[..., 2:] - box[..., :2]], axis=-1)


def cxcywh_to_xyxy(box: jax.Array) -> jax.Array:
  """(centre x, centre y, width, height) -> (xmin, ymin, xmax, ymax)."""
  return jnp.concatenate(
    [box[..., :2] - box[..., 2:] / 2, box[..., :2] + box[..., 2:] / 2], axis=-1
  )


def xyxy_to_yxyx(box: jax.Array) -> jax.Array:
  """(xmin, ymin, xmax, ymax) -> (ymin, xmin, ymax, xmax); the TF image-ops order."""
  return box[..., jnp.array([1, 0, 3, 2])]


def yxyx_to_xyxy(box: jax.Array) -> jax.Array:
  """(ymin, xmin, ymax, xmax) -> (xmin, ymin, xmax, ymax)."""
  return box[..., jnp.array([1, 0, 3, 2])]


def to_pixels(box: jax.Array, canvas_size: int) -> jax.Array:
  """Normalised xyxy -> pixel xyxy on a square canvas of side `canvas_size`."""
  return box * canvas_size


def from_pixels(box_px: jax.Array, canvas_size: int) -> jax.Array:
  """Pixel xyxy on a square canvas -> normalised xyxy."""
  return jnp.asarray(box_px, jnp.float32) / canvas_size
