"""The dense detector: targets, loss and decoding round trip, shift equivariance, fixed shapes,
the threshold answers, and its config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxloc import dense, metrics, model, scenes

STRIDE = 8
# Jitted: run eagerly, each of their ops would be compiled on its own.
decode = jax.jit(dense.decode, static_argnames=("k", "canvas_size", "stride"))
encode_targets = jax.jit(
  dense.encode_targets, static_argnames=("canvas_size", "stride", "num_classes")
)


@pytest.fixture(scope="module")
def digits(mnist_dir):
  from jaxloc import mnist

  x, y = mnist.load("train", mnist_dir=mnist_dir)
  return jnp.asarray(x[:1000]), jnp.asarray(y[:1000])


def _scene(digits, **kw):
  args = dict(batch_size=64, canvas_size=128, max_objects=5, count_probs=(0.1,) + (0.18,) * 5)
  args.update(kw)
  return scenes.sample_scene(jax.random.key(1), *digits, **args)


def _encode(scene, canvas_size=128, num_classes=10):
  return encode_targets(
    scene["box"],
    scene["label"],
    scene["valid"],
    canvas_size=canvas_size,
    stride=STRIDE,
    num_classes=num_classes,
  )


@jax.jit
def _as_outputs(targets):
  """Model outputs that are exactly the targets (heatmap probabilities -> logits)."""
  p = jnp.clip(targets["heatmap"], 1e-4, 1 - 1e-4)
  return {"heatmap": jnp.log(p) - jnp.log1p(-p), "box": targets["box"]}


def _ap(scene, det):
  scene, det = jax.device_get(scene), jax.device_get(det)
  per = {
    "valid": scene["valid"],
    "label": scene["label"],
    "box": scene["box"],
    "det_box": det["box"],
    "det_label": det["label"],
    "det_score": det["score"],
  }
  return metrics.average_precision(*metrics.scene_detections(per, classify=True))


@pytest.mark.parametrize(
  "kw",
  [
    {},
    {"size_range": (20, 36), "box_type": "tight"},
    {"size_range": (15, 40), "box_type": "ink", "paste_mode": "add"},
  ],
  ids=["patch28", "scaled_tight", "benchmark_ink"],
)
def test_decoding_the_encoded_truth_gives_back_the_truth(digits, kw):
  scene = _scene(digits, **kw)
  t = _encode(scene)
  assert float(t["heatmap"].max()) == 1.0 and int(t["centre"].sum()) == int(scene["count"].sum())
  det = decode(_as_outputs(t), k=100, canvas_size=128, stride=STRIDE)
  ans = dense.answers(det, 0.5)
  scene, det = jax.device_get((scene, det))
  np.testing.assert_array_equal(ans["count"], scene["count"])
  np.testing.assert_array_equal(ans["presence"], scene["count"] > 0)
  for i in range(64):
    n = int(scene["count"][i])
    order = np.lexsort((det["box"][i, :n, 1], det["box"][i, :n, 0]))  # the scene's order
    np.testing.assert_allclose(det["box"][i, :n][order], scene["box"][i, :n], atol=1e-5)
    np.testing.assert_array_equal(det["label"][i, :n][order], scene["label"][i, :n])
  assert _ap(scene, det) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}


def test_a_digit_of_every_size_has_one_centre_and_decodes_back_to_its_box():
  """The benchmark's sizes, 15..99 px, on its 300 px canvas at stride 8: one centre cell
  each (heatmap exactly 1 there and nowhere else), and the encoded truth decodes back."""
  sizes = np.arange(15, 100)
  rng = np.random.default_rng(0)
  x0, y0 = (rng.integers(0, 300 - sizes) for _ in range(2))
  w = sizes - rng.integers(0, sizes // 3)  # ink boxes are narrower than the square
  box = np.stack([x0, y0, x0 + w, y0 + sizes], -1)[:, None, :] / 300.0
  label = (sizes % 10)[:, None]
  valid = np.ones_like(label, bool)
  t = encode_targets(
    jnp.asarray(box, jnp.float32),
    jnp.asarray(label),
    jnp.asarray(valid),
    canvas_size=300,
    stride=STRIDE,
    num_classes=10,
  )
  det = decode(_as_outputs(t), k=100, canvas_size=300, stride=STRIDE)
  count = dense.answers(det, 0.5)["count"]
  t, det = jax.device_get((t, det))  # read on the host
  np.testing.assert_array_equal(t["centre"].sum(axis=(1, 2)), np.ones(len(sizes)))
  np.testing.assert_array_equal((t["heatmap"] == 1.0).sum(axis=(1, 2, 3)), np.ones(len(sizes)))
  np.testing.assert_allclose(det["box"][:, 0], box[:, 0], atol=1e-5)
  np.testing.assert_array_equal(det["label"][:, 0], label[:, 0])
  assert np.all(np.asarray(count) == 1)


def test_class_agnostic_targets_use_one_channel(digits):
  scene = _scene(digits)
  t = _encode(scene, num_classes=1)
  assert t["heatmap"].shape == (64, 16, 16, 1)
  np.testing.assert_array_equal(t["heatmap"][..., 0] == 1.0, t["centre"])


def test_shifting_the_boxes_by_the_stride_shifts_every_decoded_box(digits):
  scene = _scene(digits, canvas_size=112)  # digits fit 16 px from the right and bottom edge
  shifted = dict(scene, box=jnp.where(scene["valid"][..., None], scene["box"] + 16 / 128, 0.0))
  decode_truth = lambda s: decode(_as_outputs(_encode(s)), k=100, canvas_size=128, stride=STRIDE)
  a, b = jax.device_get((decode_truth(scene), decode_truth(shifted)))
  keep = a["score"] > 0.5
  np.testing.assert_allclose(b["box"][keep], a["box"][keep] + 16 / 128, atol=1e-5)
  np.testing.assert_array_equal(b["label"][keep], a["label"][keep])


def test_shifting_the_canvas_by_the_stride_shifts_the_model_outputs():
  """Fully convolutional: away from the zero padding of the border, the outputs for a canvas
  shifted by one stride are the outputs one cell over, so every decoded box moves by it."""
  net = model.DenseDetector()
  image = jax.random.uniform(jax.random.key(0), (2, 128, 128, 1))
  image = image.at[:, -STRIDE:].set(0).at[:, :, -STRIDE:].set(0)
  params = model.init_params(jax.random.key(1), net, 128)
  apply = jax.jit(net.apply)
  out = apply({"params": params}, image)
  moved = apply({"params": params}, jnp.roll(image, (STRIDE, STRIDE), axis=(1, 2)))
  inner = slice(4, 11)  # cells whose 54-px receptive field stays off the border in both
  shifted = slice(5, 12)
  for name in ("heatmap", "box"):
    np.testing.assert_allclose(
      moved[name][:, shifted, shifted], out[name][:, inner, inner], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("norm", ["none", "group"])
def test_shifting_the_canvas_by_the_coarsest_stride_shifts_the_fpn_outputs(norm):
  """The fpn network pools to stride 32, so its outputs are equivariant to shifts of 32 px
  (4 cells at stride 8), not of one output cell: a shift of 8 px changes the phase of the
  stride-16 and -32 pools (the shift test of the single-scale network is the one above).
  Random biases make the black background differ from the zero padding; the digit-like
  patch stays over 64 px (half the receptive field) from the border, and only cells whose
  receptive field stays off the border are compared. GroupNorm's statistics are over the
  whole canvas: the same values, moved."""
  net = model.DenseDetector(backbone="fpn", norm=norm)
  size = 384
  image = jnp.zeros((1, size, size, 1))
  image = image.at[:, 128:192, 128:192].set(jax.random.uniform(jax.random.key(0), (1, 64, 64, 1)))
  params = model.init_params(jax.random.key(1), net, size)

  @jax.jit  # one program, not three operations a leaf run one by one
  def jitter(params, key):
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noisy = [p + 0.05 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noisy)

  params = jitter(params, jax.random.key(2))
  apply = jax.jit(net.apply)
  out = apply({"params": params}, image)
  moved = apply({"params": params}, jnp.roll(image, (32, 32), axis=(1, 2)))
  assert out["heatmap"].shape == (1, 48, 48, 10)
  inner, shifted = slice(10, 34), slice(14, 38)  # cells 80..272 px, then 112..304 px
  for name in ("heatmap", "box"):
    np.testing.assert_allclose(
      moved[name][:, shifted, shifted], out[name][:, inner, inner], rtol=1e-4, atol=1e-4
    )
  # an 8 px shift moves the patch by one cell, but the outputs not exactly
  nudged = apply({"params": params}, jnp.roll(image, (8, 8), axis=(1, 2)))
  assert not np.allclose(nudged["heatmap"][:, 11:35, 11:35], out["heatmap"][:, inner, inner])


def test_fpn_grid_is_the_canvas_over_the_stride():
  for stride, canvas_size in ((8, 100), (4, 75)):  # not multiples of 32: padded, then cropped
    net = model.DenseDetector(backbone="fpn", stride=stride)
    params = model.init_params(jax.random.key(0), net, canvas_size)
    out = jax.jit(net.apply)({"params": params}, jnp.zeros((1, canvas_size, canvas_size, 1)))
    g = dense.grid_size(canvas_size, stride)
    assert out["heatmap"].shape == (1, g, g, 10) and out["box"].shape == (1, g, g, 4)


def test_decoding_has_fixed_shapes_and_traces_once():
  traces = []

  @jax.jit
  def run(outputs):
    traces.append(1)
    return dense.decode(outputs, k=7, canvas_size=75, stride=STRIDE)

  for seed in range(3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    outputs = {
      "heatmap": jax.random.normal(k1, (3, 10, 10, 10)),
      "box": jax.random.normal(k2, (3, 10, 10, 4)),
    }
    det = run(outputs)
    assert det["box"].shape == (3, 7, 4) and det["label"].shape == det["score"].shape == (3, 7)
    assert det["label"].dtype == jnp.int32
    assert np.all(np.diff(np.asarray(det["score"]), axis=1) <= 0)  # sorted by score
  assert len(traces) == 1


def test_loss_is_finite_and_box_part_zero_on_empty_canvases(digits):
  scene = _scene(digits, count_probs=(1.0, 0, 0, 0, 0, 0), batch_size=4)
  assert int(scene["count"].sum()) == 0
  net = model.DenseDetector()
  params = model.init_params(jax.random.key(0), net, 128)
  loss_fn = lambda p: dense.scene_loss(
    net.apply({"params": p}, scene["image"]),
    scene,
    canvas_size=128,
    stride=STRIDE,
    num_classes=10,
    heatmap_weight=1.0,
    box_weight=1.0,
  )
  (loss, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert np.isfinite(float(loss)) and float(parts["box_loss"]) == 0.0
  assert float(parts["heatmap_loss"]) > 0.0
  assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))


def test_giou_term_is_zero_at_the_truth_and_its_gradient_finite(digits):
  """The GIoU term (`giou_weight`) is 0 when the boxes are the targets, positive otherwise,
  and huge predicted sizes at cells without an object leave the gradient finite."""
  scene = _scene(digits, batch_size=4)
  geometry = dict(canvas_size=128, stride=STRIDE, num_classes=10)
  t = encode_targets(scene["box"], scene["label"], scene["valid"], **geometry)
  loss = lambda box: dense.scene_loss(
    {"heatmap": jnp.zeros_like(t["heatmap"]), "box": box},
    scene,
    **geometry,
    heatmap_weight=1.0,
    box_weight=1.0,
    giou_weight=2.0,
  )
  _, exact = loss(t["box"])
  assert float(exact["giou_loss"]) == pytest.approx(0.0, abs=1e-5)
  off = jnp.where(t["centre"][..., None], t["box"] + 0.3, 500.0)  # exp(500) = inf off-centre
  (value, parts), grad = jax.value_and_grad(loss, has_aux=True)(off)
  assert float(parts["giou_loss"]) > 0.0
  assert float(value) == pytest.approx(
    float(parts["heatmap_loss"] + parts["box_loss"] + 2.0 * parts["giou_loss"]), rel=1e-6
  )
  assert np.isfinite(np.asarray(grad)).all()


def test_focal_loss_by_hand():
  logits = jnp.array([0.0, 2.0, -1.0]).reshape(1, 1, 3, 1)
  target = jnp.array([1.0, 0.5, 0.0]).reshape(1, 1, 3, 1)
  p = 1 / (1 + np.exp(-np.array([0.0, 2.0, -1.0])))
  expected = -(
    (1 - p[0]) ** 2 * np.log(p[0])
    + (1 - 0.5) ** 4 * p[1] ** 2 * np.log(1 - p[1])
    + p[2] ** 2 * np.log(1 - p[2])
  )
  assert float(dense.focal_loss(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_threshold_answers_on_hand_made_heatmaps():
  prob = np.full((2, 4, 4, 10), 0.01, np.float32)
  prob[0, 0, 0, 3], prob[0, 2, 2, 7], prob[0, 3, 0, 1] = 0.9, 0.4, 0.2  # three separate peaks
  prob[1, 1, 1, 5] = 0.25  # one weak peak only
  outputs = {"heatmap": np.log(prob) - np.log1p(-prob), "box": np.zeros((2, 4, 4, 4), np.float32)}
  det = jax.device_get(decode(outputs, k=5, canvas_size=32, stride=STRIDE))
  np.testing.assert_allclose(det["score"][0, :3], [0.9, 0.4, 0.2], rtol=1e-5)
  np.testing.assert_array_equal(det["label"][0, :3], [3, 7, 1])
  ans = dense.answers(det, 0.3)
  np.testing.assert_array_equal(ans["count"], [2, 0])
  np.testing.assert_array_equal(ans["presence"], [True, False])
  np.testing.assert_array_equal(ans["keep"][0], [True, True, False, False, False])
  assert dense.answers(det, 0.2)["count"].tolist() == [3, 1]
  decode_prob = lambda prob: decode(
    {"heatmap": np.log(prob) - np.log1p(-prob), "box": outputs["box"]},
    k=5,
    canvas_size=32,
    stride=STRIDE,
  )
  # A cell next to a higher one of its class is not a peak: it scores 0.
  prob[0, 0, 1, 3] = 0.8
  assert 0.8 not in np.round(np.asarray(decode_prob(prob)["score"][0]), 5)
  # A second class at the same cell, or next to it, is a detection (for AP) but not an
  # answer: one object is counted once.
  prob[0, 0, 1, 3] = 0.01
  prob[0, 2, 2, 4], prob[0, 2, 3, 9] = 0.35, 0.33
  det = jax.device_get(decode_prob(prob))
  np.testing.assert_allclose(det["score"][0, :5], [0.9, 0.4, 0.35, 0.33, 0.2], rtol=1e-5)
  np.testing.assert_array_equal(det["primary"][0], [True, True, False, False, True])
  assert dense.answers(det, 0.3)["count"].tolist() == [2, 0]
