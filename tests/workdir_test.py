"""The workdir: atomic files, torn logs, config differences, and its lifecycle (prepare,
resume or refuse, move aside) as a run meets it."""

import json
import os

import pytest
from conftest import small_config, train_run

from jaxloc import configs, members, workdir
from jaxloc.errors import UserError


def test_write_json_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
  path = str(tmp_path / "a.json")
  workdir.write_json(path, {"b": 1, "a": [1, 2]})
  workdir.write_json(path, {"b": 2})
  assert workdir.read_json(path) == {"b": 2}
  assert os.listdir(tmp_path) == ["a.json"]


def test_read_jsonl_drops_a_torn_last_line_and_truncate_keeps_steps(tmp_path):
  path = str(tmp_path / "m.jsonl")
  for step in (1, 2, 3):
    workdir.append_jsonl(path, {"step": step})
  with open(path, "a") as f:
    f.write('{"step": 4, "tor')
  assert [r["step"] for r in workdir.read_jsonl(path)] == [1, 2, 3]
  assert [r["step"] for r in workdir.truncate_jsonl(path, 2)] == [1, 2]
  assert [json.loads(line)["step"] for line in open(path)] == [1, 2]
  assert workdir.read_jsonl(str(tmp_path / "absent.jsonl")) == []


def test_config_diff_names_the_fields():
  old, new = {"a": 1, "b": (1, 2), "c": 3}, {"a": 2, "b": [1, 2], "d": 4}
  assert workdir.config_diff(old, new) == ["a: 1 -> 2", "c: 3 -> '<absent>'", "d: '<absent>' -> 4"]
  assert workdir.config_diff(old, new, frozenset({"a", "c", "d"})) == []


def test_move_aside_keeps_the_lock_and_never_reuses_a_name(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / ".lock").write_text("")
  (run / "metrics.json").write_text("1")
  first = workdir.move_aside(str(run))
  (run / "metrics.json").write_text("2")
  second = workdir.move_aside(str(run))
  assert first != second and os.listdir(run) == [".lock"]
  assert open(os.path.join(first, "metrics.json")).read() == "1"
  assert open(os.path.join(second, "metrics.json")).read() == "2"


def _resume(path, config, latest, fresh=False):
  return members.decide_resume(configs.read(config), str(path), latest, fresh=fresh)


def test_resume_step_decides_new_resume_or_refusal(tmp_path):
  config = small_config("")
  assert _resume(tmp_path, config, None) is None  # nothing there: a new run
  workdir.write_json(str(tmp_path / workdir.CONFIG), config.to_dict())
  assert _resume(tmp_path, config, 4) == 4  # same config, unfinished: resume
  more = small_config("", epochs=5)
  assert _resume(tmp_path, more, 6) == 6  # more epochs of a constant schedule: go on
  cosine = small_config("", epochs=5, lr_schedule="cosine")
  with pytest.raises(UserError, match="epochs: 2 -> 5"):
    _resume(tmp_path, cosine, 6)  # under a decaying schedule, epochs may not change
  with pytest.raises(UserError, match="batch_size: 8 -> 4"):
    _resume(tmp_path, small_config("", batch_size=4), 4)
  assert os.path.exists(tmp_path / workdir.CONFIG)  # refusals move nothing
  assert _resume(tmp_path, small_config("", batch_size=4), 4, fresh=True) is None
  assert os.listdir(tmp_path) == []  # --fresh moved the old run aside
  assert len(list(tmp_path.parent.glob(tmp_path.name + ".old-*"))) == 1


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "file"
  path.write_text("keep me")
  with pytest.raises(UserError, match="is a file"):
    train_run(small_config(""), str(path))
  assert path.read_text() == "keep me"


def test_finished_workdir_is_not_overwritten(mnist_dir, tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.json").write_text('{"accuracy": 0.99}')
  with pytest.raises(UserError, match="holds results of a run without config.json"):
    train_run(small_config(mnist_dir), str(run))
  workdir.write_json(str(run / "config.json"), small_config(mnist_dir).to_dict())
  with pytest.raises(UserError, match="holds a finished run of 6 steps"):
    train_run(small_config(mnist_dir), str(run))
  assert (run / "metrics.json").read_text() == '{"accuracy": 0.99}'


def test_workdir_that_cannot_be_created(tmp_path):
  parent = tmp_path / "a-file"
  parent.write_text("")
  with pytest.raises(UserError, match="cannot create workdir .*Not a directory"):
    train_run(small_config(""), str(parent / "run"))
