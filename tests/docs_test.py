"""The docs stay true: every Python block of README.md and docs/*.md runs as written, the
blocks of one file in order in one namespace, right after the README's smoke command (its
workdir, runs/smoke, is the session's smoke run); and no line of them tells history."""

import glob
import os
import re

import pytest
from conftest import ROOT

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
HISTORY = re.compile(
  r"before it|re-measured|previous version|default now|issue \d|project brief|/work/|/home/",
  re.I,
)


def python_blocks(path: str) -> list[str]:
  with open(os.path.join(ROOT, path)) as f:
    return BLOCK.findall(f.read())


@pytest.mark.parametrize("path", [p for p in DOCS if python_blocks(p)])
def test_python_blocks_run_as_written(path, smoke_run, mnist_dir, tmp_path, monkeypatch):
  (tmp_path / "runs").mkdir()
  os.symlink(smoke_run[0], tmp_path / "runs" / "smoke")
  monkeypatch.chdir(tmp_path)  # runs/smoke as the smoke command leaves it, the repository unchanged
  monkeypatch.setenv("JAXLOC_MNIST_DIR", mnist_dir)
  namespace = {"__name__": "__docs__"}
  for i, block in enumerate(python_blocks(path)):
    try:
      exec(compile(block, f"{path} block {i + 1}", "exec"), namespace)
    except Exception as e:
      raise AssertionError(f"{path}, Python block {i + 1} fails: {e!r}\n{block}") from e


@pytest.mark.parametrize("path", DOCS)
def test_no_line_tells_history_or_a_path_of_one_machine(path):
  with open(os.path.join(ROOT, path)) as f:
    bad = [f"{path}:{n}: {line.strip()}" for n, line in enumerate(f, 1) if HISTORY.search(line)]
  assert not bad, "\n".join(bad)


def test_the_readme_is_short():
  with open(os.path.join(ROOT, "README.md")) as f:
    assert len(f.readlines()) <= 200
