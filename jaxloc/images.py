"""Reading a user's image files and rendering digits from fonts, as MNIST-like canvases.

How an image file becomes a canvas (`canvas_from_file`), in this order:
1. It is read as greyscale (colour is averaged by Pillow's "L" conversion).
2. If its mean brightness is above one half, it is inverted: MNIST digits are
   light ink on a black background, so dark ink on white paper is flipped.
3. A canvas-sized image (H = W = canvas_size) is used as is.
4. Any other image is scaled, keeping its aspect ratio, only if it does not fit
   (the longer side becomes canvas_size), then pasted in the centre of a black canvas.
   A 28x28 digit thus sits unscaled in the middle of the canvas.
"""

import numpy as np
from PIL import Image

from jaxloc.errors import UserError


def read_grey(path: str) -> np.ndarray:
  """An image file (PNG, JPEG, ...) as uint8 greyscale [H, W]."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("L"), np.uint8)
  except FileNotFoundError:
    raise UserError(f"image {path!r} not found") from None
  except OSError as e:
    raise UserError(f"{path}: not a readable image ({e})") from None


def to_canvas(grey_HxW: np.ndarray, canvas_size: int) -> tuple[np.ndarray, tuple[int, int, float]]:
  """uint8 canvas [S, S] and (x offset, y offset, scale) of the image on it."""
  grey = grey_HxW
  if grey.mean() > 127.5:
    grey = 255 - grey
  h, w = grey.shape
  if (h, w) == (canvas_size, canvas_size):
    return grey, (0, 0, 1.0)
  scale = min(1.0, canvas_size / max(h, w))
  if scale < 1.0:
    w, h = max(1, round(w * scale)), max(1, round(h * scale))
    grey = np.asarray(Image.fromarray(grey).resize((w, h), Image.BILINEAR))
  canvas = np.zeros((canvas_size, canvas_size), np.uint8)
  y0, x0 = (canvas_size - h) // 2, (canvas_size - w) // 2
  canvas[y0 : y0 + h, x0 : x0 + w] = grey
  return canvas, (x0, y0, scale)


def canvas_from_file(path: str, canvas_size: int) -> np.ndarray:
  return to_canvas(read_grey(path), canvas_size)[0]


def mnist_like(grey_HxW: np.ndarray) -> np.ndarray:
  """Fits ink into a 20x20 box centred in 28x28, as MNIST's digits were made."""
  ys, xs = np.nonzero(grey_HxW > 0)
  if len(ys) == 0:
    return np.zeros((28, 28), np.uint8)
  crop = grey_HxW[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
  h, w = crop.shape
  scale = 20.0 / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  crop = np.asarray(Image.fromarray(crop).resize(size, Image.LANCZOS))
  out = np.zeros((28, 28), np.uint8)
  y0, x0 = (28 - crop.shape[0]) // 2, (28 - crop.shape[1]) // 2
  out[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
  return out


def font_digits(fonts=("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono")) -> tuple:
  """Digits 0-9 rendered from fonts that ship with matplotlib: uint8 [N,28,28], int32 [N]."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  images, labels = [], []
  for family in fonts:
    for weight in ("normal", "bold"):
      for digit in range(10):
        fig = Figure(figsize=(0.64, 0.64), dpi=100, facecolor="black")
        fig.text(
          0.5,
          0.5,
          str(digit),
          color="white",
          fontsize=36,
          family=family,
          weight=weight,
          ha="center",
          va="center",
        )
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        grey = np.asarray(canvas.buffer_rgba())[..., 0]
        images.append(mnist_like(grey))
        labels.append(digit)
  return np.stack(images), np.asarray(labels, np.int32)
