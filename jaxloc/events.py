"""TensorBoard event files of a run, in `workdir/tensorboard/`: `tensorboard --logdir runs`.

Written with tensorboardX (numpy + protobuf; no TensorFlow): every metrics.jsonl
record's numbers as scalars at its step (`train/loss`, `val/AP50`, ...), and
predictions.png as an image after every evaluation. A run resumed from step t starts a
new event file with `purge_step` t + 1, so TensorBoard drops what the interrupted run
logged after its last checkpoint (the resumed run logs those steps again).
"""

import os

import numpy as np
from PIL import Image
from tensorboardX import SummaryWriter

DIR = "tensorboard"
NOT_SCALARS = frozenset({"step", "epoch", "steps_averaged"})


class EventWriter:
  """Scalars and images for TensorBoard; `None` work_dir writes nothing (other processes)."""

  def __init__(self, work_dir: str | None, resume_step: int | None = None):
    self._writer = None
    if work_dir is not None:
      log_dir = os.path.join(work_dir, DIR)
      purge = None if resume_step is None else resume_step + 1
      self._writer = SummaryWriter(log_dir, purge_step=purge, flush_secs=30)

  def scalars(self, record: dict) -> None:
    """Every number of a metrics.jsonl `record` but its step/epoch fields, at its step."""
    if self._writer is None:
      return
    for key, value in record.items():
      if key not in NOT_SCALARS and isinstance(value, int | float):
        self._writer.add_scalar(key, value, record["step"])

  def image(self, tag: str, png_path: str, step: int) -> None:
    """The PNG at `png_path` as image `tag` at `step`."""
    if self._writer is not None and os.path.exists(png_path):
      with Image.open(png_path) as png:
        pixels = np.asarray(png, np.float32) / 255.0  # [H, W, 3 or 4] in [0, 1]
      self._writer.add_image(tag, pixels, step, dataformats="HWC")

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
