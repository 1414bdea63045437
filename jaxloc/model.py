"""The seed's backbone (three conv + average-pool stages, one dense layer) and its heads.

    image [B,75,75,1] -> Conv(16,3x3,VALID,relu) -> AvgPool(2) -> Conv(32) -> AvgPool
      -> Conv(64) -> AvgPool -> Flatten [B,3136] -> Dense(128,relu)
      -> class head Dense(10) (logits) and box head Dense(4) (normalised xyxy, linear)

426,638 parameters at 75x75x1, exactly as the Keras model summary.

`Conv3x3` has the parameters of `flax.linen.Conv(features, (3, 3), padding="VALID")`
(`kernel` [3,3,Cin,Cout], `bias` [Cout]) and computes the convolution per backend
(`CONV_IMPL`): with `conv3x3_valid` ("matmul"), which XLA:CPU runs several times faster
than its native convolution and its gradient (benchmark parts `profile`, `conv_formulations`,
`conv_steps`), or as `jax.lax.conv_general_dilated` ("lax"). The tests check that both give
the same outputs and gradients.
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


def _patches(x_BxHxWxC: jax.Array) -> jax.Array:
  """All 3x3 VALID patches as rows, [B*Ho*Wo, 9*C] in (dy, dx, c) order: one gather
  (cheaper than 9 slices + concatenate)."""
  b, h, w, c = x_BxHxWxC.shape
  rows = np.arange(h - 2)[:, None] + np.arange(3)[None, :]  # [Ho, 3]
  cols = np.arange(w - 2)[:, None] + np.arange(3)[None, :]  # [Wo, 3]
  return x_BxHxWxC[:, rows[:, None, :, None], cols[None, :, None, :]].reshape(-1, 9 * c)


def _forward(x_BxHxWxC, kernel_3x3xCxF, patches):
  b, h, w, c = x_BxHxWxC.shape
  ho, wo, f = h - 2, w - 2, kernel_3x3xCxF.shape[-1]
  if patches is None:  # one input channel: 9 multiply-adds, which XLA fuses with what follows
    terms = [
      x_BxHxWxC[:, dy : dy + ho, dx : dx + wo] * kernel_3x3xCxF[None, None, dy, dx]
      for dy in range(3)
      for dx in range(3)
    ]
    return sum(terms[1:], terms[0])
  return (patches @ kernel_3x3xCxF.reshape(9 * c, f)).reshape(b, ho, wo, f)


@jax.custom_vjp
def conv3x3_valid(x_BxHxWxC: jax.Array, kernel_3x3xCxF: jax.Array, bias_F: jax.Array) -> jax.Array:
  """3x3 VALID convolution, stride 1, plus bias: [B,H,W,C] -> [B,H-2,W-2,F], written for
  XLA:CPU. Forward: one matrix product over the 3x3 patches (9 multiply-adds when C = 1).
  Gradient: the kernel's, the patches^T x output-gradient matrix product; the input's, XLA's
  convolution of the output gradient (zero-padded by 2) with the flipped kernel, which
  XLA:CPU runs fast (its kernel gradient is the slow part), instead of the scatter-add that
  is the transpose of the patch gather. When C = 1 the kernel's and the bias' gradients are
  one product: the 9 shifted input planes and a row of ones, [10, N] x [N, F]."""
  return _conv3x3_fwd(x_BxHxWxC, kernel_3x3xCxF, bias_F)[0]


def _conv3x3_fwd(x, kernel, bias):
  patches = None if x.shape[-1] == 1 else _patches(x)
  # The kernel's gradient needs the patches: kept, or (C = 1) x's 9 shifted planes.
  y = _forward(x, kernel, patches) + bias[None, None, None, :]
  return y, (x if patches is None else patches, kernel)


def _conv3x3_bwd(residuals, g_BxHoxWoxF):
  x_or_patches, kernel = residuals
  kernel_grad, bias_grad = _kernel_gradient(x_or_patches, g_BxHoxWoxF, kernel)
  return _input_gradient(g_BxHoxWoxF, kernel), kernel_grad, bias_grad


def _kernel_gradient(x_or_patches, g_BxHoxWoxF, kernel_3x3xCxF):
  """The kernel's and the bias' gradients of a 3x3 VALID convolution: patches^T x output
  gradient and the output gradient's sum, from the patches [N, 9C], or from the 1-channel
  input [B,H,W,1] as one product of its 9 shifted planes and a row of ones (no [N, 9]
  patch tensor, whose rows of 9 XLA:CPU writes slowly)."""
  f = kernel_3x3xCxF.shape[-1]
  g = g_BxHoxWoxF.reshape(-1, f)
  if x_or_patches.ndim == 2:
    return (x_or_patches.T @ g).reshape(kernel_3x3xCxF.shape), g.sum(axis=0)
  x = x_or_patches[..., 0]
  ho, wo = x.shape[1] - 2, x.shape[2] - 2
  planes = [x[:, dy : dy + ho, dx : dx + wo] for dy in range(3) for dx in range(3)]
  rows = jnp.stack([*planes, jnp.ones_like(planes[0])]).reshape(10, -1)  # [10, N]
  both = rows @ g
  return both[:9].reshape(kernel_3x3xCxF.shape), both[9]


conv3x3_valid.defvjp(_conv3x3_fwd, _conv3x3_bwd)


@jax.custom_batching.custom_vmap
def _input_gradient(g_BxHoxWoxF, kernel_3x3xCxF):
  """The input's gradient of a 3x3 VALID convolution: XLA's convolution of the output
  gradient, zero-padded by 2, with the flipped kernel."""
  flipped = jnp.transpose(kernel_3x3xCxF[::-1, ::-1], (0, 1, 3, 2))  # [3, 3, F, C]
  g = jnp.pad(g_BxHoxWoxF, ((0, 0), (2, 2), (2, 2), (0, 0)))
  dims = ("NHWC", "HWIO", "NHWC")
  return jax.lax.conv_general_dilated(g, flipped, (1, 1), "VALID", dimension_numbers=dims)


@_input_gradient.def_vmap
def _input_gradient_vmap(axis_size, in_batched, g, kernel):
  """Under vmap (replicas: one kernel per member) one convolution per member, not the
  grouped convolution JAX's batching would make of it, which XLA:CPU runs several times
  slower; with one kernel, the members' batches as one batch."""
  g_batched, kernel_batched = in_batched
  if not kernel_batched:
    folded = _input_gradient(g.reshape(-1, *g.shape[2:]), kernel)
    return folded.reshape(axis_size, -1, *folded.shape[1:]), True
  g = g if g_batched else jnp.broadcast_to(g, (axis_size, *g.shape))
  return jnp.stack([_input_gradient(g[i], kernel[i]) for i in range(axis_size)]), True


# How Conv3x3 computes per backend (impl = "auto"); backends not listed use "matmul". CPU:
# measured (benchmark parts `profile` and `conv_steps`). GPU and TPU: "lax" is the
# accelerators' own convolution, not yet measured against "matmul" here: run `profile` on
# one and list the faster.
CONV_IMPL = {"cpu": "matmul"}
CONV_IMPLS = ("matmul", "lax")


class Conv3x3(nn.Module):
  """3x3 convolution, stride 1 (VALID, or SAME: the input is zero-padded by one pixel on
  each side, so the output keeps its size), with `conv3x3_valid` or XLA's convolution
  (`impl`: "matmul", "lax", or "auto": `CONV_IMPL` of the backend)."""

  features: int
  padding: str = "VALID"
  impl: str = "auto"

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.padding == "SAME":
      x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    c = x_BxHxWxC.shape[-1]
    kernel = self.param("kernel", KERAS_INIT, (3, 3, c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    impl = CONV_IMPL.get(jax.default_backend(), "matmul") if self.impl == "auto" else self.impl
    if impl == "lax":
      dims = ("NHWC", "HWIO", "NHWC")
      y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel, (1, 1), "VALID", dimension_numbers=dims)
      return y + bias[None, None, None, :]
    return conv3x3_valid(x_BxHxWxC, kernel, bias)  # VALID: 75 -> 73, as the reference model


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
NORMS = ("none", "group")


GROUPS = 8  # GroupNorm groups (fewer when a layer has fewer channels)


def _conv_block(x, features: int, norm: str) -> jax.Array:
  """3x3 SAME convolution (`Conv3x3`), GroupNorm when `norm` is "group", relu. Called inside a
  compact method, so its layers are named in the calling module (Conv3x3_i, GroupNorm_i)."""
  x = Conv3x3(features, padding="SAME")(x)
  if norm == "group":
    x = nn.GroupNorm(num_groups=min(GROUPS, features))(x)
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
  digit is seen whole. `norm` = "group" puts GroupNorm (8 groups) after every 3x3 conv
  (no batch statistics: nothing to carry in the train state). G = ceil(H / stride). The
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
  def __call__(self, image_BxHxWx1: jax.Array) -> dict[str, jax.Array]:
    _, h, w, _ = image_BxHxWx1.shape
    s = self.stride
    if self.backbone == "fpn":
      x = _pyramid(image_BxHxWx1, self)
    else:
      pad = ((0, 0), (0, -h % s), (0, -w % s), (0, 0))
      x = jnp.pad(image_BxHxWx1, pad)
      pools = s.bit_length() - 1  # stride = 2 ** pools (checked with the config)
      for i, features in enumerate(self.conv_features):
        x = _conv_block(x, features, self.norm)
        if i < pools:
          x = avg_pool_2x2(x)
    for features in self.context_features:
      x = _conv_block(x, features, self.norm)
    bias = -np.log((1.0 - self.prior) / self.prior)
    heatmap = nn.Dense(
      self.num_classes,
      kernel_init=KERAS_INIT,
      bias_init=nn.initializers.constant(bias),
      name="heatmap_head",
    )(x)
    box = nn.Dense(4, kernel_init=KERAS_INIT, name="box_head")(x)
    return {"heatmap": heatmap, "box": box}


def _pyramid(image_BxHxWx1: jax.Array, net: DenseDetector) -> jax.Array:
  """The fpn backbone and neck of `net` (called inside its compact `__call__`): features
  [B, G, G, neck_features] at the output stride."""
  _, h, w, _ = image_BxHxWx1.shape
  stages = tuple(net.conv_features) + tuple(net.pyramid_features)
  top = 2 ** len(stages)
  x = jnp.pad(image_BxHxWx1, ((0, 0), (0, -h % top), (0, -w % top), (0, 0)))
  levels = []  # levels[i]: the output of stage i, stride 2 ** (i + 1)
  for features in stages:
    x = avg_pool_2x2(_conv_block(x, features, net.norm))
    levels.append(x)
  lateral = lambda y, i: nn.Dense(net.neck_features, kernel_init=KERAS_INIT, name=f"lateral_{i}")(y)
  out_level = net.stride.bit_length() - 2  # the stage whose output has the output stride
  x = lateral(levels[-1], len(levels) - 1)
  for i in range(len(levels) - 2, out_level - 1, -1):
    x = upsample_2x(x) + lateral(levels[i], i)
  return x[:, : -(-h // net.stride), : -(-w // net.stride)]


def num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def init_params(key: jax.Array, model: nn.Module, canvas_size: int):
  """The model's initial parameters for canvases of `canvas_size`. Jitted: run eagerly, every
  initializer op is compiled on its own (9 s on a GPU for the seed's model, against well under
  1 s); the values are the same bit for bit (checked on CPU for every model)."""
  x = jnp.zeros((1, canvas_size, canvas_size, 1), jnp.float32)
  return jax.jit(model.init)(key, x)["params"]
