"""What a run writes in its workdir, written so that a kill never leaves a torn file.

config.json      the run's config, at start
metrics.jsonl    one JSON object per logged training step and per evaluation
params.msgpack   the trained parameters (flax.serialization)
metrics.json     the final validation metrics and run statistics
curves.png       train / validation class and box loss per epoch
predictions.png  validation canvases, true box green, predicted box red
"""

import json
import os
import tempfile

CONFIG, METRICS_LOG, PARAMS, METRICS = (
  "config.json",
  "metrics.jsonl",
  "params.msgpack",
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
