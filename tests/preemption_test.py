"""SIGTERM / SIGINT stop a run after saving its step; damaged checkpoints fall back; a
failing write keeps what was there. Each against a run that was never interrupted."""

import errno
import glob
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import types

import pytest
from conftest import (
  ROOT,
  long_config,
  newest_checkpoint,
  resume_config,
  small_config,
  stopped_step,
  strip,
  train_cli,
  train_run,
  wait_for_first_record,
)

from jaxloc import checkpoint, preemption, workdir
from jaxloc.errors import Stopped, UserError


def train_steps_logged(run_dir) -> list[tuple[int, int]]:
  records = workdir.read_jsonl(str(run_dir / workdir.METRICS_LOG))
  return [(r["step"], r["steps_averaged"]) for r in records if "steps_averaged" in r]


def test_signal_at_a_random_moment_then_resume(mnist_dir, tmp_path, long_run):
  """SIGINT (Ctrl-C) at a random moment; SIGTERM at a random moment is the multi-process
  test's (`multiprocess_test`, which resumes with the same command), and its exit status 143
  `test_signal_before_any_step_...`."""
  sig = signal.SIGINT
  ref_dir, reference = long_run
  config, run = long_config(mnist_dir), tmp_path / "run"
  delay = random.uniform(0.0, 0.3)  # within the 35 steps after the first record
  proc = subprocess.Popen(train_cli(config, run), cwd=ROOT, stderr=subprocess.PIPE, text=True)
  wait_for_first_record(proc, run)
  time.sleep(delay)
  assert proc.poll() is None, f"the run ended before the signal ({delay:.3f} s after its first log)"
  proc.send_signal(sig)
  time.sleep(random.uniform(0.0, 0.1))
  if proc.poll() is None:
    proc.send_signal(sig)  # a second signal, e.g. during the save, is ignored
  _, err = proc.communicate(timeout=240)
  assert proc.returncode == 128 + sig, err[-2000:]
  step = stopped_step(err, sig.name, 40)
  assert "Traceback" not in err
  assert newest_checkpoint(run) == step, f"signal {delay:.3f} s after the first log"
  logged = train_steps_logged(run)
  assert logged[-1][0] == step and sum(n for _, n in logged) == step, "a step was not logged"

  lines = []
  resumed = train_run(config, run, echo=lines.append)
  assert any(f"resuming at step {step}" in line for line in lines), lines
  assert (run / workdir.PARAMS).read_bytes() == (ref_dir / workdir.PARAMS).read_bytes()
  assert strip(resumed) == strip(reference)
  logged = train_steps_logged(run)
  assert sum(n for _, n in logged) == 40 and len({s for s, _ in logged}) == len(logged)


def test_signal_before_any_step_saves_nothing(mnist_dir, tmp_path, monkeypatch):
  class Early(preemption.Signals):
    def __enter__(self):
      self.request(signal.SIGTERM)  # as if the signal came while the run was starting
      return self

  monkeypatch.setattr(preemption, "Signals", Early)
  config, run = small_config(mnist_dir, epochs=1), tmp_path / "run"
  with pytest.raises(Stopped, match="SIGTERM at step 0 of 3") as stop:
    train_run(config, str(run))
  assert stop.value.exit_status == 143
  assert not any((run / "checkpoints").iterdir())
  monkeypatch.undo()
  assert train_run(config, str(run))["steps"] == 3


# Damaged checkpoints: three ways to damage the newest one's largest data file.


def _damage(step_dir, how: str) -> None:
  files = glob.glob(str(step_dir / "**" / "d" / "*"), recursive=True)
  largest = max(files, key=os.path.getsize)
  if how == "truncated":
    os.truncate(largest, os.path.getsize(largest) // 2)
  elif how == "overwritten":
    with open(largest, "r+b") as f:
      f.write(os.urandom(os.path.getsize(largest)))
  else:
    os.remove(largest)


@pytest.mark.parametrize("how", ["truncated", "overwritten", "deleted"])
def test_damaged_newest_checkpoint_falls_back(mnist_dir, one_epoch_run, resume_run, how):
  ref_dir, reference = resume_run
  run = one_epoch_run[0]
  _damage(run / "checkpoints" / "6", how)

  lines = []
  final = train_run(resume_config(mnist_dir), str(run), echo=lines.append)
  said = [line for line in lines if "cannot be read" in line]
  assert len(said) == 1 and "checkpoint of step 6" in said[0] and "using step 4" in said[0]
  assert final["resumed_from_step"] == 4
  assert (run / workdir.PARAMS).read_bytes() == (ref_dir / workdir.PARAMS).read_bytes()
  assert strip(final) == strip(reference)
  moved = [p.name for p in (run / "checkpoints").iterdir() if ".damaged-" in p.name]
  assert len(moved) == 1 and moved[0].startswith("6.damaged-"), moved
  records = workdir.read_jsonl(str(run / workdir.METRICS_LOG))
  assert [s for s, _ in train_steps_logged(run)] == [2, 4, 6, 8, 10, 12]  # cut back to 4
  assert [r["epoch"] for r in records if "val/num_val" in r] == [1, 2]


def test_no_readable_checkpoint_is_one_error_and_fresh_starts_over(
  mnist_dir, tmp_path, one_epoch_run
):
  run = one_epoch_run[0]
  for step in (2, 4, 6):
    _damage(run / "checkpoints" / str(step), "deleted")
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  with pytest.raises(
    checkpoint.Unreadable, match=r"no checkpoint .* can be read \(step 6: .*--fresh"
  ):
    train_run(resume_config(mnist_dir), str(run))
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing moved

  final = train_run(resume_config(mnist_dir), str(run), fresh=True)
  assert final["resumed_from_step"] is None and final["steps"] == 12
  backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(backups) == 1 and sorted(os.listdir(backups[0] / "checkpoints")) == before


def test_killed_after_the_last_checkpoint_finishes_on_resume(mnist_dir, one_epoch_run):
  run, first = one_epoch_run
  os.remove(run / workdir.METRICS)  # as if killed while exporting
  again = train_run(resume_config(mnist_dir, epochs=1), str(run))
  assert again["resumed_from_step"] == 6 and strip(again) == strip(first)


def _raised(raise_it) -> BaseException:
  try:
    raise_it()
  except Exception as e:
    return e


def test_orbax_late_reports_are_logged_and_other_ones_printed(monkeypatch, caplog):
  """An abandoned read that Orbax's code raised in, collected after a damaged checkpoint was
  passed over, and a TensorStore callback into Orbax's closed event loop reach the commands'
  log at INFO, not the console, whether Python reports them as unraisable or asyncio as a
  task's exception nobody retrieved; any other is printed as Python prints it."""
  from experiments import cli

  namespace = {}
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "serialization.py")
  code = "def read():\n  raise ValueError('FAILED_PRECONDITION')\n"
  exec(compile(code, orbax_file, "exec"), namespace)

  def wrapped():  # as Orbax's own wrapper raises it: from the read's error
    try:
      namespace["read"]()
    except ValueError as e:
      raise Exception("Encountered error while reading array index") from e

  def closed_loop():
    raise RuntimeError("Event loop is closed")

  def other():
    raise ValueError("a user's own")

  orbax, closed, own = _raised(wrapped), _raised(closed_loop), _raised(other)
  assert "orbax" not in str(traceback.extract_tb(orbax.__traceback__))  # only in its cause's
  printed = []
  monkeypatch.setattr(sys, "unraisablehook", printed.append)
  asyncio_log = logging.getLogger("asyncio")
  monkeypatch.setattr(asyncio_log, "filters", [])
  cli.log_late_checkpoint_reports()
  caplog.set_level("INFO")
  for e in (orbax, closed, own):
    sys.unraisablehook(types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__))
    asyncio_log.error("Task exception was never retrieved", exc_info=(type(e), e, e.__traceback__))
  assert [str(u.exc_value) for u in printed] == ["a user's own"]
  errors = [r for r in caplog.records if r.levelname == "ERROR"]
  assert [str(r.exc_info[1]) for r in errors] == ["a user's own"]
  late = [r.getMessage() for r in caplog.records if "late report" in r.getMessage()]
  assert len(late) == 4 and all(r.levelname == "INFO" for r in caplog.records if r not in errors)
  assert "FAILED_PRECONDITION" in late[0] and "Event loop is closed" in late[2]


def _with_file_size_limit(cmd: list[str], limit: int) -> list[str]:
  """`cmd` (a Python command) run with files limited to `limit` bytes: a write past it fails
  with EFBIG, as on a full disk (Python ignores SIGXFSZ). The limit is set in a fresh
  interpreter that then execs `cmd`, so the test process never forks with threads running."""
  code = (
    "import os, resource, sys; "
    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
    "os.execv(sys.argv[1], sys.argv[1:])"
  )
  return [sys.executable, "-c", code, *cmd]


def test_failing_checkpoint_write_keeps_the_previous_one(mnist_dir, one_epoch_run, resume_run):
  """A write that fails (here: files may not grow past 64 KiB, as on a full disk) ends in
  one error line; the previous checkpoint is intact and the same command resumes."""
  ref_dir, reference = resume_run
  run = one_epoch_run[0]
  config = resume_config(mnist_dir)
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")
  cmd = _with_file_size_limit(train_cli(config, run), 64 * 1024)
  failing = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
  assert failing.returncode == 2, failing.stderr[-2000:]
  errors = [line for line in failing.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "checkpoint of step 6 is kept" in errors[0], failing.stderr[-2000:]
  assert "Traceback" not in failing.stderr
  assert newest_checkpoint(run) == 6

  again = train_run(config, str(run))  # the same config, in this process
  assert again["resumed_from_step"] == 6
  assert (run / workdir.PARAMS).read_bytes() == (ref_dir / workdir.PARAMS).read_bytes()
  assert strip(workdir.read_json(str(run / workdir.METRICS))) == strip(reference)


def test_a_failing_output_write_is_one_error_and_keeps_the_checkpoints(
  mnist_dir, tmp_path, monkeypatch
):
  run, real_write = tmp_path / "run", workdir.write_bytes_atomic

  def full_disk(path, data):
    if path.endswith(workdir.PARAMS):
      raise OSError(errno.ENOSPC, "No space left on device", path)
    real_write(path, data)

  monkeypatch.setattr(workdir, "write_bytes_atomic", full_disk)
  with pytest.raises(UserError, match=r"cannot write .*params.msgpack \(No space left on device\)"):
    train_run(resume_config(mnist_dir, epochs=1), str(run))
  assert newest_checkpoint(run) == 6 and not (run / workdir.METRICS).exists()
  monkeypatch.undo()
  final = train_run(resume_config(mnist_dir, epochs=1), str(run))
  assert final["resumed_from_step"] == 6 and (run / workdir.PARAMS).exists()
