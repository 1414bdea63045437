"""The seed's backbone (three conv + average-pool stages, one dense layer) and its heads.

    image [B,75,75,1] -> Conv(16,3x3,VALID,relu) -> AvgPool(2) -> Conv(32) -> AvgPool
      -> Conv(64) -> AvgPool -> Flatten [B,3136] -> Dense(128,relu)
      -> class head Dense(10) (logits) and box head Dense(4) (normalised xyxy, linear)

426,638 parameters at 75x75x1, exactly as the Keras model summary.

`Conv3x3` has the parameters of `flax.linen.Conv(features, (3, 3), padding="VALID")`
(`kernel` [3,3,Cin,Cout], `bias` [Cout]) but computes the convolution as one
matrix product over 3x3 patches. XLA:CPU runs that, and the matrix products of
its gradient, several times faster than its native convolution; the tests check
that outputs and gradients match `jax.lax.conv_general_dilated`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Keras' default kernel initialiser (biases start at zero in both), for parity with the seed.
KERAS_INIT = nn.initializers.glorot_uniform()


def avg_pool_2x2(x_BxHxWxC: jax.Array) -> jax.Array:
  """2x2 average pool, stride 2, VALID (an odd last row/column is dropped, as in Keras)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Conv3x3(nn.Module):
  """3x3 convolution, stride 1, as a patches x kernel matrix product (VALID, or SAME: the
  input is zero-padded by one pixel on each side, so the output keeps its size)."""

  features: int
  padding: str = "VALID"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.padding == "SAME":
      x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    b, h, w, c = x_BxHxWxC.shape
    kernel = self.param("kernel", KERAS_INIT, (3, 3, c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    ho, wo = h - 2, w - 2  # VALID padding: 75 -> 73, as in the reference model summary
    rows = np.arange(ho)[:, None] + np.arange(3)[None, :]  # [Ho, 3]
    cols = np.arange(wo)[:, None] + np.arange(3)[None, :]  # [Wo, 3]
    # One gather builds all 3x3 patches: [B, Ho, Wo, 3, 3, C] (cheaper than 9 slices + concat).
    patches = x_BxHxWxC[:, rows[:, None, :, None], cols[None, :, None, :]]
    y = patches.reshape(b * ho * wo, 9 * c) @ kernel.reshape(9 * c, self.features)
    return (y + bias[None, :]).reshape(b, ho, wo, self.features)


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


class DenseDetector(nn.Module):
  """A fully convolutional detector of the CenterNet kind ("Objects as Points").

      image [B,H,W,1] -> zero-pad bottom/right to a multiple of `stride`
        -> the seed's conv stages with SAME padding, the first log2(stride) followed by a
           2x2 average pool (cell (i, j) covers canvas pixels [stride*i, stride*(i+1)))
        -> context convs (3x3, SAME, relu) at the output stride, so the receptive field
           covers the largest digit (38 px with one, 54 px with two at stride 8)
        -> per cell: heatmap logits [B,G,G,C] and a box [B,G,G,4] (see `jaxloc.dense`)

  G = ceil(H / stride). The heatmap bias starts at -log((1 - prior) / prior), so every
  cell starts out predicting "no object" with probability 1 - prior (CenterNet, RetinaNet).
  """

  num_classes: int = 10
  conv_features: Sequence[int] = (16, 32, 64)
  context_features: Sequence[int] = (128, 128)
  stride: int = 8
  prior: float = 0.01

  @nn.compact
  def __call__(self, image_BxHxWx1: jax.Array) -> dict[str, jax.Array]:
    _, h, w, _ = image_BxHxWx1.shape
    s = self.stride
    pad = ((0, 0), (0, -h % s), (0, -w % s), (0, 0))
    x = jnp.pad(image_BxHxWx1, pad)
    pools = s.bit_length() - 1  # stride = 2 ** pools (checked with the config)
    for i, features in enumerate(self.conv_features):
      x = nn.relu(Conv3x3(features, padding="SAME")(x))
      if i < pools:
        x = avg_pool_2x2(x)
    for features in self.context_features:
      x = nn.relu(Conv3x3(features, padding="SAME")(x))
    bias = -np.log((1.0 - self.prior) / self.prior)
    heatmap = nn.Dense(
      self.num_classes,
      kernel_init=KERAS_INIT,
      bias_init=nn.initializers.constant(bias),
      name="heatmap_head",
    )(x)
    box = nn.Dense(4, kernel_init=KERAS_INIT, name="box_head")(x)
    return {"heatmap": heatmap, "box": box}


def num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def init_params(key: jax.Array, model: nn.Module, canvas_size: int):
  """The model's initial parameters for canvases of `canvas_size`. Jitted: run eagerly, every
  initializer op is compiled on its own (9 s on a GPU for the seed's model, against well under
  1 s); the values are the same bit for bit (checked on CPU for every model)."""
  x = jnp.zeros((1, canvas_size, canvas_size, 1), jnp.float32)
  return jax.jit(model.init)(key, x)["params"]
