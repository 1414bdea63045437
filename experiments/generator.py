"""The MNIST-detection generator's scenes (github.com/hukkelas/MNIST-ObjectDetection,
`generate_data.py`), written again in numpy, independent of `jaxloc.canvas`: what
`experiments.outside_scenes` scores a run on. No flags here, so tests can import it."""

import numpy as np

CANVAS = 300
SIDES = (15, 100)  # numpy's randint(15, 100): 15..99
MAX_IOU = 0.25


def resize_linear(digit: np.ndarray, side: int) -> np.ndarray:
  """cv2.resize(digit, (side, side)) with INTER_LINEAR on float32, in numpy."""

  def weights(n_in: int, n_out: int):
    f = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(f).astype(int)
    a = f - i0
    low, high = i0 < 0, i0 >= n_in - 1
    a[low | high] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), a

  i0, i1, a = weights(digit.shape[0], side)
  rows = digit[i0] * (1 - a)[:, None] + digit[i1] * a[:, None]
  return rows[:, i0] * (1 - a)[None, :] + rows[:, i1] * a[None, :]


def _iou(a, b) -> float:
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _tight(digit: np.ndarray, x0: int, y0: int) -> list[int]:
  cols, rows = np.nonzero(digit.sum(axis=0))[0], np.nonzero(digit.sum(axis=1))[0]
  if cols.size == 0:
    return [x0, y0, x0 + digit.shape[1], y0 + digit.shape[0]]
  return [x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1]


def make_scenes(rng, digits, labels, num: int, min_count: int, max_count: int):
  """num canvases uint8 [num, 300, 300] and per canvas a list of (label, xmin, ymin, xmax,
  ymax) in pixels."""
  images, targets = np.zeros((num, CANVAS, CANVAS), np.uint8), []
  for n in range(num):
    im, boxes_, labels_ = np.zeros((CANVAS, CANVAS), np.float32), [], []
    for _ in range(rng.integers(min_count, max_count + 1)):
      while True:
        side = int(rng.integers(*SIDES))
        x0, y0 = (int(v) for v in rng.integers(0, CANVAS - side, size=2))
        square = [x0, y0, x0 + side, y0 + side]
        if all(_iou(square, b) < MAX_IOU for b in boxes_):
          break
      i = int(rng.integers(len(labels)))
      digit = resize_linear(digits[i].astype(np.float32), side)
      boxes_.append(_tight(digit, x0, y0))
      labels_.append(int(labels[i]))
      im[y0 : y0 + side, x0 : x0 + side] += digit
      np.minimum(im, 255, out=im)
    images[n] = im.astype(np.uint8)
    targets.append([(lab, *b) for lab, b in zip(labels_, boxes_, strict=True)])
  return images, targets
