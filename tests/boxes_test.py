import jax.numpy as jnp
import numpy as np
import pytest

from jaxloc import boxes


def _iou(a, b):
  return float(boxes.iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))


def test_iou_hand_computed():
  assert _iou([0, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(1.0)  # identical
  assert _iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0  # disjoint
  assert _iou([0, 0, 1, 1], [1, 0, 2, 1]) == 0.0  # touching edges
  assert _iou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(4 / 16)  # contained
  assert _iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # corner overlap
  assert _iou([0, 0, 2, 1], [1, 0, 3, 1]) == pytest.approx(1 / 3)  # half overlap
  assert _iou([1, 1, 0, 0], [1, 1, 0, 0]) == 0.0  # inverted (empty) boxes


def test_giou_hand_computed():
  giou = lambda a, b: float(boxes.giou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
  assert giou([0, 0, 2, 2], [0, 0, 2, 2]) == pytest.approx(1.0)  # identical
  assert giou([0, 0, 1, 1], [2, 0, 3, 1]) == pytest.approx(-1 / 3)  # apart: hull 3, union 2
  assert giou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7 - 2 / 9)  # hull 9, union 7
  assert giou([0, 0, 4, 4], [1, 1, 3, 3]) == pytest.approx(4 / 16)  # contained: the IoU
  far = boxes.giou(np.array([0.0, 0, 1, 1]), np.array([99.0, 99, 100, 100]))
  assert -1.0 < far < -0.99  # numpy in, numpy out


def test_iou_elementwise_and_shape_check():
  a = jnp.array([[0, 0, 1, 1], [0, 0, 2, 2]], jnp.float32)
  b = jnp.array([[0, 0, 1, 1], [1, 1, 3, 3]], jnp.float32)
  np.testing.assert_allclose(boxes.iou(a, b), [1.0, 1 / 7], rtol=1e-6)
  with pytest.raises(ValueError, match="one shape"):
    boxes.iou(a, b[0])


def test_pairwise_iou():
  a = jnp.array([[0, 0, 1, 1], [0, 0, 2, 2]], jnp.float32)
  b = jnp.array([[0, 0, 1, 1], [1, 1, 3, 3], [5, 5, 6, 6]], jnp.float32)
  m = boxes.pairwise_iou(a, b)
  assert m.shape == (2, 3)
  np.testing.assert_allclose(m, [[1, 0, 0], [0.25, 1 / 7, 0]], rtol=1e-6)
  host = boxes.pairwise_iou(np.asarray(a), np.asarray(b))  # numpy in, numpy out
  assert isinstance(host, np.ndarray) and host.dtype == np.float32
  np.testing.assert_array_equal(host, m)


def test_patch_box_convention():
  box = boxes.patch_box(jnp.array(10), jnp.array(20), 28, 75)
  np.testing.assert_allclose(box, np.array([10, 20, 38, 48]) / 75, rtol=1e-6)


@pytest.mark.parametrize(
  "there,back",
  [
    (boxes.xyxy_to_xywh, boxes.xywh_to_xyxy),
    (boxes.xyxy_to_cxcywh, boxes.cxcywh_to_xyxy),
    (boxes.xyxy_to_yxyx, boxes.yxyx_to_xyxy),
  ],
)
def test_conversions_round_trip(there, back):
  box = jnp.array([[0.1, 0.2, 0.5, 0.9], [0.0, 0.3, 0.4, 0.35]])
  np.testing.assert_allclose(back(there(box)), box, atol=1e-7)


def test_conversions_values():
  box = jnp.array([0.1, 0.2, 0.5, 0.9])
  np.testing.assert_allclose(boxes.xyxy_to_xywh(box), [0.1, 0.2, 0.4, 0.7], atol=1e-7)
  np.testing.assert_allclose(boxes.xyxy_to_cxcywh(box), [0.3, 0.55, 0.4, 0.7], atol=1e-7)
  np.testing.assert_allclose(boxes.xyxy_to_yxyx(box), [0.2, 0.1, 0.9, 0.5], atol=1e-7)
  np.testing.assert_allclose(boxes.to_pixels(box, 100), [10, 20, 50, 90], atol=1e-5)
  np.testing.assert_allclose(boxes.from_pixels(jnp.array([10, 20, 50, 90]), 100), box, atol=1e-7)
