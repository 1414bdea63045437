"""What a run records: `Log` (metrics.jsonl, TensorBoard, the console), `EpochMeans` (the
train metrics of the epoch in progress, rebuilt from the log on resume) and `summary`
(mean, std, min, max of replica members' final figures, for summary.json)."""

import concurrent.futures
import os

import numpy as np

from jaxloc import events, workdir


class Log:
  """Where the loop's records go: metrics.jsonl, TensorBoard, the console, `history`."""

  def __init__(self, out_dir: str, resume_step: int | None, main_process: bool, echo, plot):
    self.out_dir, self.echo, self.plot = out_dir, echo, plot
    self.path = os.path.join(out_dir, workdir.METRICS_LOG)
    self.records = workdir.truncate_jsonl(self.path, resume_step or 0)
    self.history = [r for r in self.records if "val/num_val" in r]  # evaluation records
    self.events = events.EventWriter(out_dir if main_process else None, resume_step)
    self._drawn = []  # futures of the drawing thread

  def write(self, record: dict) -> None:
    workdir.append_jsonl(self.path, record)
    self.events.scalars(record)
    if "val/num_val" in record:
      self.history.append(record)

  def predictions(self, step: int, per: dict) -> None:
    """predictions.png of this evaluation (`per`), also into TensorBoard. The device work
    happens now; the drawing, the file and the TensorBoard image on the drawing thread, while
    training goes on (`close` waits for it, and raises what failed there)."""
    for done in [f for f in self._drawn if f.done()]:
      self._drawn.remove(done)
      done.result()

    def later(draw):
      def job():
        draw()
        self.events.image("predictions", os.path.join(self.out_dir, "predictions.png"), step)

      self._drawn.append(_drawing_thread().submit(job))

    self.plot(per, draw=later)

  def close(self) -> None:
    try:
      for drawn in self._drawn:
        drawn.result()
    finally:
      self._drawn = []
      self.events.close()


_DRAWING = []  # the process's one drawing thread (matplotlib is not thread-safe), once started


def _drawing_thread() -> concurrent.futures.ThreadPoolExecutor:
  if not _DRAWING:
    _DRAWING.append(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxloc-draw"))
  return _DRAWING[0]


class EpochMeans:
  """Sums of the train metrics of the epoch in progress, rebuilt from its log on resume."""

  def __init__(self, records: list[dict], epoch_start: int):
    self.sums, self.count = {}, 0
    for r in records:
      if "steps_averaged" in r and r["step"] > epoch_start:
        n = r["steps_averaged"]
        self.add({k[6:]: v * n for k, v in r.items() if k.startswith("train/")}, n)

  def add(self, sums: dict, count: int) -> None:
    """Adds the metric sums of `count` steps."""
    for k, v in sums.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += count

  def means(self) -> dict[str, float]:
    return means(self.sums, self.count)


def means(sums: dict, count: int) -> dict[str, float]:
  return {f"train/{k}": float(v) / count for k, v in sums.items()}


def summary(finals: list[dict], mode: str, images_per_s: float, varied: dict) -> dict:
  """mean, std, min, max over the members of every number of their metrics.json; `varied`:
  the values listed per member (`replicas.varied`)."""
  flat = [flatten(f) for f in finals]
  keys = [k for k, v in flat[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
  figures = {}
  for k in keys:
    values = np.array([f[k] for f in flat], np.float64)
    figures[k] = dict(
      mean=float(values.mean()),
      std=float(values.std()),
      min=float(values.min()),
      max=float(values.max()),
    )
  return dict(
    figures=figures,
    members=len(finals),
    replica_mode=mode,
    images_per_s=images_per_s,
    varied={k: list(v) for k, v in varied.items()},
  )


def flatten(final: dict, prefix: str = "") -> dict:
  """metrics.json with its nested groups (`raw`) as `raw/<key>`."""
  out = {}
  for k, v in final.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + k] = v
  return out
