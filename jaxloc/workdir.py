"""What a run writes in its workdir, written so that a kill never leaves a torn file.

config.json      the run's config, at start
metrics.jsonl    one JSON object per logged training step and per evaluation
params.msgpack   the trained parameters (flax.serialization; the moving average when kept)
batch_stats.msgpack  the BatchNorm running statistics (models with BatchNorm only)
metrics.json     the final validation metrics and run statistics
curves.png       train / validation losses per epoch
predictions.png  validation canvases, true boxes green, predicted boxes red (the first
                 `config.num_plot`; none, and no heatmap.png, when it is 0)
pr.png, detections.json, ground_truth.json
                 scene cases: precision-recall at IoU 0.5, COCO files of the validation set
heatmap.png      dense detector: validation scenes beside its heatmap
tensorboard/     TensorBoard events: the metrics.jsonl figures, predictions.png per epoch
checkpoints/     Orbax checkpoints of the train state (params, moving average, BatchNorm
                 statistics, Adam state, step); `<step>.damaged-<time>`: one that could not
                 be read, moved aside
.lock            held (flock) while a run uses the workdir

JSON, plots and parameters are written to a temporary file and renamed into place.
The lifecycle of a workdir is here too: `prepare` it, decide with `resume_step`
whether a run starts, resumes or is refused, and `move_aside` a run replaced by --fresh.
"""

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import time

from absl import logging

from jaxloc.errors import UserError

CONFIG, METRICS_LOG, PARAMS, BATCH_STATS, METRICS = (
  "config.json",
  "metrics.jsonl",
  "params.msgpack",
  "batch_stats.msgpack",
  "metrics.json",
)


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it into place."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()


def read_jsonl(path: str) -> list[dict]:
  """All complete records; a torn last line (from a killed run) is ignored."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):
        break
      records.append(json.loads(line))
  return records


@contextlib.contextmanager
def lock(path: str):
  """Holds an exclusive lock on workdir `path` for the duration of a run.

  The lock is an `flock` on `path/.lock`: the kernel releases it when the process
  dies, so a lock left by a killed run never blocks the next one.
  """
  fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with open(os.path.join(path, ".lock")) as f:
        owner = f.read().strip() or "another process"
      raise UserError(
        f"workdir {path!r} is in use by a running job ({owner}); wait for it to finish "
        "or pass another --workdir"
      ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    yield
  finally:
    os.close(fd)


def config_diff(old: dict, new: dict, ignore: frozenset[str] = frozenset()) -> list[str]:
  """Human-readable differences between two config dicts, skipping fields in `ignore`."""
  lines = []
  for key in sorted(set(old) | set(new)):
    if key in ignore:
      continue
    a, b = _as_json(old.get(key, "<absent>")), _as_json(new.get(key, "<absent>"))
    if a != b:
      lines.append(f"{key}: {a!r} -> {b!r}")
  return lines


def _as_json(value):
  """A config value as it reads back from config.json: tuples as lists, at every depth (a
  saved scene config's size_range is a list, today's a tuple)."""
  if isinstance(value, dict):
    return {k: _as_json(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_as_json(v) for v in value]
  return value


def move_aside(path: str) -> str:
  """Moves the contents of workdir `path` (all but its lock) to a new sibling; returns it."""
  stamp = time.strftime("%Y%m%d-%H%M%S")
  backup = f"{path.rstrip(os.sep)}.old-{stamp}"
  n = 1
  while os.path.exists(backup):
    backup = f"{path.rstrip(os.sep)}.old-{stamp}-{n}"
    n += 1
  os.makedirs(backup)
  for name in os.listdir(path):
    if name != ".lock":
      os.rename(os.path.join(path, name), os.path.join(backup, name))
  return backup


def truncate_jsonl(path: str, last_step: int) -> list[dict]:
  """Keeps the complete records with step <= `last_step` (atomically); returns them."""
  records = [r for r in read_jsonl(path) if r["step"] <= last_step]
  write_bytes_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
  return records


def prepare(path: str) -> None:
  """Creates workdir `path` if needed; a file there or no write access is a `UserError`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"workdir {path!r} is a file; pass a directory path as --workdir")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    msg = f"cannot create workdir {path!r}: {e.strerror}; choose another --workdir"
    raise UserError(msg) from None
  if not os.access(path, os.W_OK):
    raise UserError(f"workdir {path!r} is not writable; choose another --workdir")


def resume_step(
  path: str,
  fields: dict,
  latest: int | None,
  total_steps: int,
  *,
  fresh: bool,
  resumable,
  upgrade,
  ended: str,
  finished_file=METRICS,
):
  """Decides between a new run (None), a resume (the step to resume from) and a refusal.

  `fields` is the new run's config as a dict, `latest` the step of the newest checkpoint,
  `total_steps` the run's last step, `resumable` the fields that may differ from the saved
  config.json, `upgrade` fills the fields an older config.json lacks, `ended` says how to
  train on after a finished run and `finished_file` is written at the end. A run that
  cannot be resumed (another config, finished, results without config) is a `UserError`;
  with `fresh` it is moved aside instead and a new run starts.
  """
  config_path = os.path.join(path, CONFIG)
  finished = os.path.exists(os.path.join(path, finished_file))
  if latest is None and not finished:
    return None  # nothing to resume: a new run (a partial log of a run killed early is replaced)
  old = upgrade(read_json(config_path)) if os.path.exists(config_path) else None
  problem = _resume_problem(path, fields, latest, total_steps, old, resumable, finished, ended)
  if problem is None:
    return latest
  if not fresh:
    raise UserError(
      problem + "\nUse another --workdir, or pass --fresh to move the old run "
      "aside (nothing is deleted) and start over here."
    )
  logging.warning("moved the previous run in %s to %s", path, move_aside(path))
  return None


def _resume_problem(path, fields, latest, total, old, resumable, finished, ended):
  """Why the run in `path` (config `old`, newest checkpoint `latest`) cannot go on; or None."""
  if old is None:
    return f"workdir {path!r} holds results of a run without {CONFIG}"
  diff = config_diff(old, fields, resumable)
  if diff:
    return f"workdir {path!r} holds a run with another config; differing fields:\n  " + (
      "\n  ".join(diff)
    )
  if latest is None or latest > total or (latest == total and finished):
    return f"workdir {path!r} holds a finished run of {latest or total} steps; {ended}"
  return None
