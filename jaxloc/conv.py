"""The seed model's 3x3 convolution, written for XLA:CPU.

`Conv3x3` has the parameters of `flax.linen.Conv(features, (3, 3), padding="VALID")`
(`kernel` [3,3,Cin,Cout], `bias` [Cout]) and computes the convolution per backend
(`CONV_IMPL`): with `conv3x3_valid` ("matmul": a matrix product over the 3x3 patches, with
its own gradient and its own batching rule), which XLA:CPU runs several times faster than
its native convolution and that convolution's gradient (docs/speed.md), or as
`jax.lax.conv_general_dilated` ("lax"). The tests check that both give the same outputs and
gradients, alone and under vmap.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Keras' default kernel initialiser (biases start at zero in both), for parity with the seed.
KERAS_INIT = nn.initializers.glorot_uniform()


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
  (`impl`: "matmul", "lax", or "auto": `CONV_IMPL` of the backend). `use_bias` False: no
  bias (before a BatchNorm, whose shift takes its place)."""

  features: int
  padding: str = "VALID"
  impl: str = "auto"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
    if self.padding == "SAME":
      x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    c = x_BxHxWxC.shape[-1]
    kernel = self.param("kernel", KERAS_INIT, (3, 3, c, self.features))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    else:
      bias = jnp.zeros((self.features,), x_BxHxWxC.dtype)
    impl = CONV_IMPL.get(jax.default_backend(), "matmul") if self.impl == "auto" else self.impl
    if impl == "lax":
      dims = ("NHWC", "HWIO", "NHWC")
      y = jax.lax.conv_general_dilated(x_BxHxWxC, kernel, (1, 1), "VALID", dimension_numbers=dims)
      return y + bias[None, None, None, :]
    return conv3x3_valid(x_BxHxWxC, kernel, bias)  # VALID: 75 -> 73, as the reference model
