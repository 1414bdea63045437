import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxloc import canvas, stream
from jaxloc.errors import UserError


@pytest.fixture(scope="module")
def digits():
  rng = np.random.default_rng(0)
  d = rng.integers(0, 256, (50, 28, 28)).astype(np.uint8)
  d[:, :3] = 0  # some zero rows, like real digits
  return jnp.asarray(d), jnp.asarray(rng.integers(0, 10, 50), jnp.int32)


def test_shapes_dtypes_range(digits):
  b = canvas.training_batch(jax.random.key(0), 0, *digits, batch_size=16, canvas_size=75)
  assert b["image"].shape == (16, 75, 75, 1) and b["image"].dtype == jnp.float32
  assert b["label"].shape == (16,) and b["label"].dtype == jnp.int32
  assert b["box"].shape == (16, 4) and b["box"].dtype == jnp.float32
  assert float(b["image"].min()) >= 0.0 and float(b["image"].max()) <= 1.0


def test_same_key_same_batch_different_key_different_batch(digits):
  a = canvas.training_batch(jax.random.key(1), 0, *digits, batch_size=8)
  b = canvas.training_batch(jax.random.key(1), 0, *digits, batch_size=8)
  c = canvas.training_batch(jax.random.key(2), 0, *digits, batch_size=8)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["box"], c["box"])


@pytest.mark.parametrize("batch_size,num", [(8, 20), (64, 5000), (7, 3)])
def test_stream_reads_every_example_once_per_pass(batch_size, num):
  key = jax.random.key(4)
  steps = 3 * num // batch_size + 2  # crosses several pass ends, mid-batch
  index = jax.jit(stream.stream_index, static_argnums=(2, 3))
  idx = np.concatenate([index(key, jnp.int32(t), batch_size, num) for t in range(steps)])
  for p in range(len(idx) // num):
    chunk = idx[p * num : (p + 1) * num]
    np.testing.assert_array_equal(np.sort(chunk), np.arange(num))
  first, second = idx[:num], idx[num : 2 * num]
  assert num < 5 or not np.array_equal(first, second)  # a fresh order each pass


@pytest.mark.parametrize("num", [1, 2, 4096, 4097])
def test_permute_index_is_a_permutation(num):
  perm = lambda seed: jax.vmap(lambda i: stream.permute_index(jax.random.key(seed), i, num))(
    jnp.arange(num)
  )
  np.testing.assert_array_equal(np.sort(perm(0)), np.arange(num))
  assert num < 5 or not np.array_equal(perm(0), perm(1))


def test_training_batch_depends_on_key_and_step_only(digits):
  args = dict(batch_size=8, canvas_size=40)
  a = canvas.training_batch(jax.random.key(1), jnp.int32(5), *digits, **args)
  b = canvas.training_batch(jax.random.key(1), jnp.int32(5), *digits, **args)
  c = canvas.training_batch(jax.random.key(1), jnp.int32(6), *digits, **args)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  assert not np.array_equal(a["box"], c["box"])


def test_patch_at_box_equals_digit_and_ink_inside(digits):
  d, y = digits
  idx = np.arange(20) % 50
  xy = jax.jit(canvas.sample_offsets, static_argnums=(1, 2))(jax.random.key(3), 20, 75)
  b = jax.jit(canvas.render, static_argnames="canvas_size")(d[idx], y[idx], xy, canvas_size=75)
  box, images = np.asarray(b["box"]), np.asarray(b["image"])  # indexed below on the host
  for i in range(20):
    x0, y0, x1, y1 = np.rint(box[i] * 75).astype(int)
    assert (x1 - x0, y1 - y0) == (28, 28)
    image = images[i, :, :, 0]
    # The patch at the box is the digit: every pixel maps back to its uint8 value.
    np.testing.assert_allclose(image[y0:y1, x0:x1] * 255, np.asarray(d)[idx[i]], atol=1e-4)
    outside = image.copy()
    outside[y0:y1, x0:x1] = 0
    assert not outside.any(), "ink outside the box"


def test_offsets_cover_full_range():
  xy = np.asarray(canvas.sample_offsets(jax.random.key(0), 20000, 75))
  assert xy.min() == 0 and xy.max() == 75 - 28
  assert set(np.unique(xy[:, 0])) == set(range(48)) == set(np.unique(xy[:, 1]))


def test_canvas_equal_to_digit_size(digits):
  b = canvas.training_batch(jax.random.key(0), 0, *digits, batch_size=4, canvas_size=28)
  np.testing.assert_allclose(b["box"], np.tile([0, 0, 1, 1], (4, 1)))


def test_canvas_smaller_than_digit_is_rejected():
  with pytest.raises(UserError, match="smaller than a 28x28 digit"):
    canvas.check_canvas_size(20)


def test_scaled_paste_stays_in_its_square():
  digit = np.full((1, 1, 28, 28), 255, np.uint8)
  place = jax.jit(lambda *a: canvas.combine(canvas.place_digits(*a, canvas_size=40)))
  image = place(digit, np.array([[[5, 7]]]), np.array([[14]]), np.array([[True]]))[0, :, :, 0]
  ink = np.argwhere(np.asarray(image) > 0)
  assert ink.min(0).tolist() == [7, 5] and ink.max(0).tolist() == [20, 18]


def test_paste_unscaled_equals_matrix_paste(digits):
  d, _ = digits
  rng = np.random.default_rng(5)
  chosen = np.asarray(d)[rng.integers(0, 50, (6, 3))]
  xy = rng.integers(0, 40 - 28 + 1, (6, 3, 2), dtype=np.int32)  # overlapping digits: maximum
  valid = np.array([[True, True, False]] * 3 + [[False, False, False]] * 3)
  size = np.full((6, 3), 28, np.int32)
  paste = jax.jit(canvas.paste_unscaled, static_argnames="canvas_size")
  fast = paste(chosen, xy, valid, canvas_size=40)
  place = jax.jit(lambda *a: canvas.combine(canvas.place_digits(*a, canvas_size=40)))
  np.testing.assert_array_equal(fast, place(chosen, xy, size, valid))
  assert float(fast[3:].max()) == 0.0  # no valid slot: an empty canvas


def test_validation_offsets_are_fixed():
  a = canvas.validation_offsets(jax.random.key(0), 100, 75)
  b = canvas.validation_offsets(jax.random.key(0), 100, 75)
  np.testing.assert_array_equal(a, b)
