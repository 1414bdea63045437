"""Figures of a run: loss curves (as in the seed's figure) and boxes on validation canvases.

Figures are matplotlib `Figure` objects rendered to PNG by Agg, without pyplot: importing
jaxloc leaves the user's matplotlib backend (a notebook's, say) and pyplot's figures alone.
matplotlib is imported by the first figure, not by this module: a command that draws
nothing (an error, a stopped run) does not pay its import. Files are written atomically.
Each figure is laid out in inches (its axes' size, the margins and gaps around them), so it
is drawn once: `bbox_inches="tight"` would draw it twice, once to find its box.
"""

import io

import numpy as np

from jaxloc import workdir
from jaxloc.metrics import IOU_THRESHOLD


def _subplots(rows: int, cols: int, axes: tuple[float, float], pad: tuple, gap: tuple):
  """(figure, axes [rows, cols]) of a new figure: each axes `axes` (width, height) inches,
  `pad` (left, right, bottom, top) inches around them and `gap` (between columns, between
  rows) inches between them, for the tick labels, titles and texts beside the axes."""
  from matplotlib.figure import Figure

  w, h = axes
  width = pad[0] + pad[1] + cols * w + (cols - 1) * gap[0]
  height = pad[2] + pad[3] + rows * h + (rows - 1) * gap[1]
  fig = Figure(figsize=(width, height))
  fig.subplots_adjust(
    left=pad[0] / width,
    right=1 - pad[1] / width,
    bottom=pad[2] / height,
    top=1 - pad[3] / height,
    wspace=gap[0] / w,
    hspace=gap[1] / h,
  )
  return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: str) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  workdir.write_bytes_atomic(path, buf.getvalue())


PLOTTED_LOSSES = ("class_loss", "heatmap_loss", "box_loss", "count_loss")


def plot_curves(history: list[dict], path: str) -> None:
  """Train and validation losses per epoch (class and box, plus count for scenes); with a
  moving average, validation of both the averaged and the raw weights."""
  epochs = [r["epoch"] for r in history]
  parts = [p for p in PLOTTED_LOSSES if f"val/{p}" in history[-1]]
  fig, axes = _subplots(1, len(parts), (3.4, 2.9), pad=(0.6, 0.15, 0.5, 0.3), gap=(0.6, 0))
  for ax, part in zip(axes[0], parts, strict=True):
    ax.plot(epochs, [r.get(f"train/{part}") for r in history], "o-", label="train")
    raw = f"val_raw/{part}" in history[-1]  # a run with a moving average: val/ is the average
    label = "validation, averaged weights" if raw else "validation"
    ax.plot(epochs, [r[f"val/{part}"] for r in history], "o-", label=label)
    if raw:
      values = [r.get(f"val_raw/{part}") for r in history]
      ax.plot(epochs, values, "o--", label="validation, raw weights")
    ax.set_xlabel("epoch")
    ax.set_title(part.replace("_", " "))
    ax.legend()
  _save(fig, path)


def plot_pr(recall: np.ndarray, precision: np.ndarray, ap50: float, path: str) -> None:
  """Interpolated precision-recall curve at IoU 0.5 (mean over classes)."""
  fig, axes = _subplots(1, 1, (3.5, 3.1), pad=(0.6, 0.2, 0.5, 0.3), gap=(0, 0))
  ax = axes[0, 0]
  ax.plot(recall, precision)
  ax.set(
    xlabel="recall",
    ylabel="precision",
    xlim=(0, 1),
    ylim=(0, 1.02),
    title=f"IoU 0.5: AP50 = {ap50:.3f}",
  )
  _save(fig, path)


def plot_scenes(image_NxHxW: np.ndarray, per: dict, classify: bool, path: str, cols: int = 8):
  """Scenes with true boxes green and the kept detections red (class and score)."""
  size = image_NxHxW.shape[1]
  fig, axes = _grid(image_NxHxW, cols, 1.25, below=0.35, above=0.15)  # scores over boxes
  for i, ax in enumerate(axes):
    for box in per["box"][i][per["valid"][i]]:
      _rect(ax, box * size, "lime")
    for s in np.nonzero(per["det_keep"][i])[0]:
      box = per["det_box"][i, s] * size
      _rect(ax, box, "red")
      text = f"{per['det_label'][i, s]} " if classify else ""
      score = per["det_score"][i, s]
      ax.text(box[0], box[1] - 1, f"{text}{score:.2f}", color="red", fontsize=6, va="bottom")
    ax.set_title(f"count {per['count'][i]}, pred {per['pred_count'][i]}", fontsize=7, y=-0.18)
  _save(fig, path)


def plot_heatmaps(image_NxHxW: np.ndarray, per: dict, path: str, cols: int = 4):
  """Each scene beside the dense detector's heatmap (max over classes, 0..1, one pixel per
  cell), true boxes green on both: where it sees digit centres."""
  n, size = image_NxHxW.shape[0], image_NxHxW.shape[1]
  rows = -(-n // cols)
  fig, axes = _subplots(rows, 2 * cols, (1.2, 1.2), pad=(0.05, 0.05, 0.35, 0.05), gap=(0.2, 0.4))
  for ax in axes.flat:
    ax.axis("off")
  for i in range(n):
    left, right = axes.flat[2 * i], axes.flat[2 * i + 1]
    left.imshow(image_NxHxW[i], cmap="gray", vmin=0, vmax=1)
    heat = per["heatmap"][i]
    cover = heat.shape[0] * -(-size // heat.shape[0])  # pixels the grid covers (stride x G)
    right.imshow(heat, cmap="magma", vmin=0, vmax=1, extent=(-0.5, cover - 0.5, cover - 0.5, -0.5))
    right.set(xlim=(-0.5, size - 0.5), ylim=(size - 0.5, -0.5))
    for box in per["box"][i][per["valid"][i]]:
      _rect(left, box * size, "lime")
      _rect(right, box * size, "lime")
    right.set_title(f"max {heat.max():.2f}", fontsize=7, y=-0.18)
  _save(fig, path)


def _grid(image_NxHxW: np.ndarray, cols: int, side: float, *, below=0.05, above=0.05):
  """A figure with one axis per canvas (grey, [0, 1]) of `side` inches, axes off, at most
  `cols` a row and no empty columns (an empty axis still costs drawing time), `below` and
  `above` inches of room for the texts under and over each canvas; returns (fig, used
  axes)."""
  n = image_NxHxW.shape[0]
  cols = min(cols, n)
  rows = -(-n // cols)
  pad = (0.05, 0.05, below, above)
  fig, axes = _subplots(rows, cols, (side, side), pad=pad, gap=(0.25, below + above))
  for ax in axes.flat:
    ax.axis("off")
  for ax, image in zip(axes.flat, image_NxHxW, strict=False):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
  return fig, list(axes.flat[:n])


def _rect(ax, box_px, color):
  from matplotlib.patches import Rectangle

  x0, y0, x1, y1 = box_px
  ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))


def plot_predictions(
  image_NxHxW: np.ndarray,
  true_box_Nx4: np.ndarray,
  pred_box_Nx4: np.ndarray,
  pred_label_N: np.ndarray,
  iou_N: np.ndarray,
  path: str,
  *,
  true_label_N: np.ndarray | None = None,
  cols: int = 8,
) -> None:
  """Grid of canvases: true box green, predicted box red, predicted digit and IoU below.

  The IoU is written in red when below the seed's 0.6 threshold.
  """
  size = image_NxHxW.shape[1]
  fig, axes = _grid(image_NxHxW, cols, 1.05, below=0.4)
  for i, ax in enumerate(axes):
    _rect(ax, true_box_Nx4[i] * size, "lime")
    _rect(ax, pred_box_Nx4[i] * size, "red")
    label = f"pred {int(pred_label_N[i])}"
    if true_label_N is not None and int(true_label_N[i]) != int(pred_label_N[i]):
      label += f" (true {int(true_label_N[i])})"
    ax.set_title(label, fontsize=8, y=-0.22)
    low = iou_N[i] < IOU_THRESHOLD
    ax.text(
      0.02,
      0.98,
      f"IoU {iou_N[i]:.2f}",
      transform=ax.transAxes,
      va="top",
      fontsize=7,
      color="red" if low else "white",
    )
  _save(fig, path)


def plot_detections(
  image_NxHxW: np.ndarray,
  pred_box: np.ndarray,
  pred_label: np.ndarray,
  score: np.ndarray,
  path: str,
  *,
  keep: np.ndarray | None = None,
  titles: list[str] | None = None,
  cols: int = 4,
) -> None:
  """Canvases with the predicted boxes in red, labelled with class and score: one per canvas
  (box [N,4]) or the detections `keep` [N,T] marks (box [N,T,4])."""
  if pred_box.ndim == 2:  # one answer per canvas
    pred_box, pred_label, score = pred_box[:, None], pred_label[:, None], score[:, None]
  keep = np.ones(score.shape, bool) if keep is None else keep
  size = image_NxHxW.shape[1]
  fig, axes = _grid(image_NxHxW, cols, 1.75, above=0.35)
  for i, ax in enumerate(axes):
    for t in np.nonzero(keep[i])[0]:
      x0, y0 = pred_box[i, t, :2] * size
      _rect(ax, pred_box[i, t] * size, "red")
      text = f"{int(pred_label[i, t])} ({score[i, t]:.2f})"
      ax.text(x0, y0 - 1, text, color="red", fontsize=9, va="bottom")
    if titles:
      ax.set_title(titles[i], fontsize=8)
  _save(fig, path)
