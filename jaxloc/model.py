"""The seed's backbone (three conv + average-pool stages, one dense layer) and its heads.

    image [B,75,75,1] -> Conv(16,3x3,VALID,relu) -> AvgPool(2) -> Conv(32) -> AvgPool
      -> Conv(64) -> AvgPool -> Flatten [B,3136] -> Dense(128,relu)
      -> class head Dense(10) (logits) and box head Dense(4) (normalised xyxy, linear)

426,638 parameters at 75x75x1, exactly as the Keras model summary. The 3x3 convolutions are
`jaxloc.conv.Conv3x3`. Beside it: the slot detector (`Detector`) and the dense detector
(`DenseDetector`, single-scale or with a feature pyramid).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxloc.conv import KERAS_INIT, Conv3x3


def avg_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, VALID (an odd last row/column is dropped, as in Keras)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _backbone(x, conv_features: Sequence[int], dense_features: int) -> jax.Array:
  """Conv/pool stages, flatten, dense + relu. Called inside a compact method, so its
  layers belong to (and are named in) the calling module."""
  for features in conv_features:
    x = avg_pool_2x2(nn.relu(Conv3x3(features)(x)))
  x = x.reshape(x.shape[0], -1)
  return nn.relu(nn.Dense(dense_features, kernel_init=KERAS_INIT)(x))


class Localizer(nn.Module):
  """Seed backbone + class head + box head. Returns {'logits': [B,C], 'box': [B,4]}."""

  num_classes: int = 10
  conv_features: Sequence[int] = (16, 32, 64)
  dense_features: int = 128

  @nn.compact
  def __call__(self, image_BxHxWx1: jax.Array) -> dict[str, jax.Array]:
    x = _backbone(image_BxHxWx1, self.conv_features, self.dense_features)
    logits = nn.Dense(self.num_classes, kernel_init=KERAS_INIT, name="class_head")(x)
    box = nn.Dense(4, kernel_init=KERAS_INIT, name="box_head")(x)
    return {"logits": logits, "box": box}


class Detector(nn.Module):
  """Seed backbone with heads for K object slots.

  Returns {'count_logits': [B,K+1], 'objectness': [B,K] (logits),
  'logits': [B,K,C] (class, per slot), 'box': [B,K,4] (normalised xyxy, per slot)}.
  """

  max_objects: int = 2
  num_classes: int = 10
  conv_features: Sequence[int] = (16, 32, 64)
  dense_features: int = 128

  @nn.compact
  def __call__(self, image_BxHxWx1: jax.Array) -> dict[str, jax.Array]:
    k, c = self.max_objects, self.num_classes
    x = _backbone(image_BxHxWx1, self.conv_features, self.dense_features)
    dense = lambda n, name: nn.Dense(n, kernel_init=KERAS_INIT, name=name)(x)
    b = x.shape[0]
    return {
      "count_logits": dense(k + 1, "count_head"),
      "objectness": dense(k, "objectness_head"),
      "logits": dense(k * c, "class_head").reshape(b, k, c),
      "box": dense(k * 4, "box_head").reshape(b, k, 4),
    }


BACKBONES = ("single", "fpn")
NORMS = ("none", "group", "batch")


GROUPS = 8  # GroupNorm groups (fewer when a layer has fewer channels)
BATCH_NORM_MOMENTUM = 0.9  # running statistics <- 0.9 * running + 0.1 * batch (PyTorch's 0.1)


def _conv_block(x, features: int, norm: str, train: bool) -> jax.Array:
  """3x3 SAME convolution (`Conv3x3`), then GroupNorm (`norm` "group") or BatchNorm
  ("batch": the batch's statistics when `train`, else the running ones; the convolution has
  no bias, whose gradient would be rounding noise that Adam scales up), then relu. Called
  inside a compact method, so its layers are named in the calling module (Conv3x3_i, ...)."""
  x = Conv3x3(features, padding="SAME", use_bias=norm != "batch")(x)
  if norm == "group":
    x = nn.GroupNorm(num_groups=min(GROUPS, features))(x)
  elif norm == "batch":
    x = nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM)(x)
  return nn.relu(x)


def upsample_2x(x_BxHxWxC: jax.Array) -> jax.Array:
  """Nearest-neighbour upsampling by 2 along H and W."""
  return jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)


class DenseDetector(nn.Module):
  """A fully convolutional detector of the CenterNet kind ("Objects as Points").

  backbone "single" (the default of the scene cases):

      image [B,H,W,1] -> zero-pad bottom/right to a multiple of `stride`
        -> the seed's conv stages with SAME padding, the first log2(stride) followed by a
           2x2 average pool (cell (i, j) covers canvas pixels [stride*i, stride*(i+1)))
        -> context convs (3x3, SAME, relu) at the output stride, so the receptive field
           covers the largest digit (38 px with one, 54 px with two at stride 8)
        -> per cell: heatmap logits [B,G,G,C] and a box [B,G,G,4] (see `jaxloc.dense`)

  backbone "fpn" (a feature pyramid, Lin et al. 2017, as CenterNet's ResNet / DLA necks):

      image -> zero-pad to a multiple of the coarsest stride 2 ** L
        -> L conv + pool stages: `conv_features` then `pyramid_features` (strides 2 .. 2 ** L)
        -> top-down: from the coarsest stage, 1x1 lateral to `neck_features`, nearest 2x
           upsampling, sum with the next finer stage's lateral, down to the output stride
        -> context convs and the heads as above; the grid is cropped to G x G.

  At stride 8 with stages up to stride 32 the receptive field is about 126 px, so a 99 px
  digit is seen whole. `norm` = "group" puts GroupNorm (8 groups) after every 3x3 conv,
  "batch" BatchNorm (its running statistics are the `batch_stats` collection, updated by
  `__call__(image, train=True)` with `mutable=["batch_stats"]`). G = ceil(H / stride). The
  heatmap bias starts at -log((1 - prior) / prior), so every cell starts out predicting
  "no object" with probability 1 - prior (CenterNet, RetinaNet).
  """

  num_classes: int = 10
  conv_features: Sequence[int] = (16, 32, 64)
  context_features: Sequence[int] = (128, 128)
  stride: int = 8
  prior: float = 0.01
  backbone: str = "single"
  pyramid_features: Sequence[int] = (128, 128)
  neck_features: int = 128
  norm: str = "none"

  @nn.compact
  def __call__(self, image_BxHxWx1: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    _, h, w, _ = image_BxHxWx1.shape
    s = self.stride
    if self.backbone == "fpn":
      x = _pyramid(image_BxHxWx1, self, train)
    else:
      pad = ((0, 0), (0, -h % s), (0, -w % s), (0, 0))
      x = jnp.pad(image_BxHxWx1, pad)
      pools = s.bit_length() - 1  # stride = 2 ** pools (checked with the config)
      for i, features in enumerate(self.conv_features):
        x = _conv_block(x, features, self.norm, train)
        if i < pools:
          x = avg_pool_2x2(x)
    for features in self.context_features:
      x = _conv_block(x, features, self.norm, train)
    bias = -np.log((1.0 - self.prior) / self.prior)
    heatmap = nn.Dense(
      self.num_classes,
      kernel_init=KERAS_INIT,
      bias_init=nn.initializers.constant(bias),
      name="heatmap_head",
    )(x)
    box = nn.Dense(4, kernel_init=KERAS_INIT, name="box_head")(x)
    return {"heatmap": heatmap, "box": box}


def _pyramid(image_BxHxWx1: jax.Array, net: DenseDetector, train: bool) -> jax.Array:
  """The fpn backbone and neck of `net` (called inside its compact `__call__`): features
  [B, G, G, neck_features] at the output stride."""
  _, h, w, _ = image_BxHxWx1.shape
  stages = tuple(net.conv_features) + tuple(net.pyramid_features)
  top = 2 ** len(stages)
  x = jnp.pad(image_BxHxWx1, ((0, 0), (0, -h % top), (0, -w % top), (0, 0)))
  levels = []  # levels[i]: the output of stage i, stride 2 ** (i + 1)
  for features in stages:
    x = avg_pool_2x2(_conv_block(x, features, net.norm, train))
    levels.append(x)
  lateral = lambda y, i: nn.Dense(net.neck_features, kernel_init=KERAS_INIT, name=f"lateral_{i}")(y)
  out_level = net.stride.bit_length() - 2  # the stage whose output has the output stride
  x = lateral(levels[-1], len(levels) - 1)
  for i in range(len(levels) - 2, out_level - 1, -1):
    x = upsample_2x(x) + lateral(levels[i], i)
  return x[:, : -(-h // net.stride), : -(-w // net.stride)]


def num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@functools.partial(jax.jit, static_argnames=("model", "canvas_size"))
def init_variables(key: jax.Array, model: nn.Module, canvas_size: int) -> dict:
  """The model's initial variables for canvases of `canvas_size`: {"params": ...} and, with
  BatchNorm, {"batch_stats": ...}. Jitted (traced once per model and canvas size): run
  eagerly, every initializer op is compiled on its own (9 s on a GPU for the seed's model,
  against well under 1 s); the values are the same bit for bit (checked on CPU for every
  model)."""
  x = jnp.zeros((1, canvas_size, canvas_size, 1), jnp.float32)
  return dict(model.init(key, x))


def init_params(key: jax.Array, model: nn.Module, canvas_size: int):
  """The model's initial parameters (`init_variables`' "params")."""
  return init_variables(key, model, canvas_size)["params"]


def variables(params, batch_stats=None) -> dict:
  """What `Module.apply` takes: the parameters, and the BatchNorm statistics when the model
  has them (None otherwise)."""
  if batch_stats is None:
    return {"params": params}
  return {"params": params, "batch_stats": batch_stats}
