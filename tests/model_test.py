import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxloc import conv, model, parallel


def test_parameter_count_matches_keras_summary():
  params = model.init_params(jax.random.key(0), model.Localizer(), 75)
  assert model.num_params(params) == 426_638
  shapes = jax.tree_util.tree_map(lambda p: p.shape, params)
  assert shapes["Dense_0"]["kernel"] == (3136, 128)
  assert shapes["class_head"]["kernel"] == (128, 10)
  assert shapes["box_head"]["kernel"] == (128, 4)


def test_output_shapes():
  net = model.Localizer()
  params = model.init_params(jax.random.key(0), net, 75)
  out = jax.jit(net.apply)({"params": params}, jnp.zeros((3, 75, 75, 1)))
  assert out["logits"].shape == (3, 10) and out["box"].shape == (3, 4)


def _reference_conv(x, kernel, bias):
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )
  return y + bias[None, None, None, :]


@pytest.mark.parametrize("channels", [1, 3])  # 1: the multiply-adds path of "matmul"
@pytest.mark.parametrize("impl", conv.CONV_IMPLS)
def test_conv3x3_matches_lax_conv_and_its_gradient(impl, channels):
  rng, key_p = np.random.default_rng(0), jax.random.key(1)
  x = rng.standard_normal((2, 11, 9, channels), np.float32)
  layer = conv.Conv3x3(5, impl=impl)
  params = jax.jit(layer.init)(key_p, x)["params"]
  ref = nn.Conv(5, (3, 3), padding="VALID")
  ref_params = jax.jit(ref.init)(key_p, x)["params"]
  assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(jnp.shape, ref_params)
  ours = lambda p, x: layer.apply({"params": p}, x)
  theirs = lambda p, x: _reference_conv(x, p["kernel"], p["bias"])
  np.testing.assert_allclose(
    jax.jit(ours)(params, x), jax.jit(theirs)(params, x), rtol=1e-5, atol=1e-5
  )
  g = rng.standard_normal((2, 9, 7, 5), np.float32)
  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * g)
  ours_g = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
  theirs_g = jax.jit(jax.grad(loss(theirs), argnums=(0, 1)))(params, x)
  for a, b in zip(
    jax.tree_util.tree_leaves(ours_g), jax.tree_util.tree_leaves(theirs_g), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_avg_pool_drops_odd_edge():
  x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  y = model.avg_pool_2x2(x)
  assert y.shape == (1, 2, 2, 1)
  np.testing.assert_allclose(y[0, :, :, 0], [[3, 5], [13, 15]])


def test_conv3x3_impls_agree_with_same_padding_and_the_same_parameters():
  x = np.random.default_rng(0).standard_normal((2, 8, 8, 4), np.float32)
  convs = {impl: conv.Conv3x3(6, padding="SAME", impl=impl) for impl in conv.CONV_IMPLS}
  params = jax.jit(convs["matmul"].init)(jax.random.key(1), x)["params"]
  lax_params = jax.jit(convs["lax"].init)(jax.random.key(1), x)["params"]
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, lax_params))
  outs = {impl: jax.jit(layer.apply)({"params": params}, x) for impl, layer in convs.items()}
  assert outs["lax"].shape == (2, 8, 8, 6)
  np.testing.assert_allclose(outs["lax"], outs["matmul"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2])  # 1: kernel and bias gradients as one product
def test_conv3x3_gradient_under_vmap_matches_each_member(channels):
  """Replicas vmap the step over stacked parameters: the custom gradient's input convolution
  then has one kernel per member (its own batching rule); with shared parameters, one."""
  layer = conv.Conv3x3(4, impl="matmul")
  x = np.random.default_rng(0).standard_normal((3, 2, 7, 6, channels), np.float32)  # [members,B,..]
  keys = jax.random.split(jax.random.key(1), 3)
  params = jax.jit(jax.vmap(lambda k, x: layer.init(k, x)["params"]))(keys, x)
  loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  members = [parallel.member(params, i) for i in range(3)]
  xs = list(np.asarray(x))
  shared = members[0]
  for stacked, per_member in (
    (jax.jit(jax.vmap(grad))(params, x), [grad(members[i], xs[i]) for i in range(3)]),
    (jax.jit(jax.vmap(grad, in_axes=(None, 0)))(shared, x), [grad(shared, xi) for xi in xs]),
  ):
    for i in range(3):
      for a, b in zip(
        jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(per_member[i]), strict=True
      ):
        np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-5, atol=1e-5)
