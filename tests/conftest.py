"""Shared test set-up: loud rank promotion, a small MNIST directory for every test, the
small config, random digits, running the experiment commands, the runs that every
pytest-xdist worker reads (trained once a session), and the longest modules first."""

import atexit
import fcntl
import gc
import gzip
import importlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

# A pytest-xdist worker imports jax, the libraries and every test module with the garbage
# collector paused (as the commands do, experiments/__init__.py); `pytest_collection_finish`
# freezes what they made and turns it back on.
if os.environ.get("PYTEST_XDIST_WORKER"):
  gc.disable()

# The sources' bytecode written once, into their __pycache__ folders (which git ignores), and
# read by every process after, even where PYTHONDONTWRITEBYTECODE is set: the suite starts
# some forty Python processes, each of which would compile jaxloc's sources again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Tests check behaviour, not speed: XLA's quickest compilation (the suite spends most of
# its time compiling; XLA:CPU's loop emitters compile faster than its fusion emitters, and
# a program's machine code made in one piece costs less CPU than in the parts XLA hands to
# its threads, which a suite that keeps every core busy does not have spare), and one
# compilation cache shared by the session's processes (the command-line tests compile what
# the in-process tests compiled). Set before jax is imported so that the commands the tests
# start inherit them.
from jaxloc import xla_flags  # noqa: E402 (imports no jax)

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ["XLA_FLAGS"] = xla_flags.with_cpu_flags(
  os.environ.get("XLA_FLAGS", ""),
  ("--xla_cpu_use_fusion_emitters=false", "--xla_cpu_parallel_codegen_split_count=1"),
)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="jaxloc-test-xla-cache-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import smoke  # noqa: E402
from jaxloc import mnist  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def _end_worker() -> None:
  """A pytest-xdist worker, its results sent, ends without JAX's clean-up at exit and the
  interpreter's teardown (about 2 s of CPU a worker after a session; the commands skip the
  teardown too, `experiments.cli._exit`). Registered after jax, so it runs before JAX's exit
  handler."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


if os.environ.get("PYTEST_XDIST_WORKER"):
  atexit.register(_end_worker)


# Modules with the longest tests (several processes, several runs), collected first: the
# pytest-xdist workers then share out the short tests at the end, instead of one worker
# finishing a long test alone. worksteal queues them for one worker, and the other takes the
# end of that queue when its own runs out: the last modules here are the ones the two may
# run at once, so they are ones whose shared runs are made by their first tests
# (console_test's two tests read one run of two commands: on both workers at once, one would
# wait for the other).
LONGEST_FIRST = (
  "gpu_figures_test",
  "multiprocess_test",
  "batch_norm_test",
  "datasets_test",
  "parallel_test",
  "console_test",
  "scene_test",
  "preemption_test",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable


def pytest_collection_finish(session):
  """The objects made so far (the imported modules: they live to the end) moved out of the
  garbage collector's view (`gc.freeze`), which the full collections during the tests would
  otherwise scan each time (about 1 s of CPU a worker in a third of the suite); the collector
  back on in a worker, which imported with it paused."""
  gc.freeze()
  gc.enable()


def write_idx(path: str, array: np.ndarray, *, magic: int | None = None, gz: bool = True) -> None:
  """Writes a uint8 IDX file (gzip when `gz`), as the MNIST distribution does."""
  if magic is None:
    magic = 0x00000800 | array.ndim
  data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
  data += array.astype(np.uint8).tobytes()
  opener = gzip.open if gz else open
  with opener(path, "wb") as f:
    f.write(data)


def write_mnist(directory: str, splits: dict, *, gz: bool = True) -> str:
  """MNIST's four IDX files in `directory`; `splits` maps the file prefixes "train" and
  "t10k" to (images, labels)."""
  os.makedirs(directory, exist_ok=True)
  suffix = ".gz" if gz else ""
  for prefix, (images, labels) in splits.items():
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{suffix}"), images, gz=gz)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{suffix}"), labels, gz=gz)
  return directory


def fake_mnist(directory: str, n_train: int = 60, n_test: int = 40, seed: int = 0) -> str:
  """Digit-like IDX files: a bright blob per image whose position encodes nothing."""
  rng = np.random.default_rng(seed)
  splits = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = np.zeros((n, 28, 28), np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    for i, label in enumerate(labels):
      images[i, 4 + label : 20 + label // 2, 6:22] = rng.integers(100, 256)
    splits[prefix] = images, labels
  return write_mnist(directory, splits)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory, shared_dir) -> str:
  """Real MNIST when JAXLOC_MNIST_DIR is set (CI: ../shared/data/mnist), else small fakes.
  The real files are stored uncompressed once a session (the loader reads raw IDX as well as
  gzip): the suite loads MNIST about a hundred times, and inflating the 2.4 MB of gzip each
  time costs some 3 s of CPU. mnist_test reads gzip files of its own."""
  env = os.environ.get("JAXLOC_MNIST_DIR")
  if not (env and os.path.isdir(env)):
    return fake_mnist(str(tmp_path_factory.mktemp("mnist")))

  def uncompressed(folder):
    splits = {
      "train": mnist.load("train", mnist_dir=env),
      "t10k": mnist.load("test", mnist_dir=env),
    }
    return write_mnist(str(folder), splits, gz=False)

  return str(shared_once(shared_dir, "mnist", uncompressed)[0])


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository root, output captured."""
  cmd = [sys.executable, "-m", module, *args]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def run_train_command(*args: str) -> subprocess.CompletedProcess:
  return run_command("experiments.train", *args)


def kill_after_first_checkpoint(cmd: list[str], run_dir) -> None:
  """Starts `cmd` (a training run into `run_dir`) and SIGKILLs it once its first
  checkpoint is on disk; fails if the run ends before that."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()


def wait_for_first_record(proc, run_dir) -> None:
  """Waits until the run of `proc` has logged its first training steps."""
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size:
      return
    time.sleep(0.02)
  raise AssertionError(f"the run ended (status {proc.poll()}) before its first record")


def stopped_step(stderr: str, signame: str, total: int) -> int:
  """The step of the one line a stopped run prints."""
  match = re.search(rf"stopped by {signame} at step (\d+) of {total}; run the same command", stderr)
  assert match, stderr[-2000:]
  return int(match.group(1))


def newest_checkpoint(run_dir) -> int:
  """The step of the newest checkpoint in `run_dir`."""
  return max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def small_config(mnist_dir: str, **overrides):
  """experiments/configs/smoke.py (the seed's task in seconds), MNIST from `mnist_dir`,
  drawing no validation canvases (`num_plot=0`): a test that looks at predictions.png asks
  for them."""
  config = smoke.get_config()
  config.mnist_dir = mnist_dir
  config.num_plot = 0
  config.update(overrides)
  return config


def random_digits(n: int = 32, seed: int = 0):
  """`n` random 28x28 uint8 "digits" and int32 labels, as device arrays."""
  rng = np.random.default_rng(seed)
  return (
    jax.numpy.asarray(rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)),
    jax.numpy.asarray(rng.integers(0, 10, n), jax.numpy.int32),
  )


def train_run(config, work_dir, **kwargs) -> dict:
  """`train.train_and_evaluate` of a ConfigDict, read as the train script reads it."""
  from jaxloc import configs, train

  return train.train_and_evaluate(configs.read(config), str(work_dir), **kwargs)


TIMING = (
  "train_images_per_s",
  "train_s",
  "compile_s",
  "eval_s",
  "save_s",
  "wall_s",
  "resumed_from_step",
)


def resume_config(mnist_dir, **overrides):
  """The smoke config at 2 epochs of 6 steps, a checkpoint and a record every 2 steps."""
  base = dict(steps_per_epoch=6, checkpoint_every=2, log_every=2, num_val=32)
  base.update(overrides)
  return small_config(mnist_dir, **base)


@pytest.fixture(scope="session")
def resume_run(mnist_dir, shared_dir):
  """(workdir, final figures) of `resume_config`, trained once: the uninterrupted run that
  the resume and damaged-checkpoint tests compare with."""
  return shared_run(shared_dir, "resume", resume_config(mnist_dir))


@pytest.fixture
def one_epoch_run(mnist_dir, shared_dir, tmp_path):
  """(workdir, figures): a copy of the session's finished 1-epoch `resume_config` run
  (checkpoints at steps 2, 4 and 6), the copy this test's to change."""
  run, figures = shared_run(shared_dir, "resume-one-epoch", resume_config(mnist_dir, epochs=1))
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run", figures


def train_cli(config, run_dir) -> list[str]:
  """The train command of `config` (every field as an override) into `run_dir`."""
  args = [f"--config.{k}={v}" for k, v in config.to_dict().items() if k != "conv_features"]
  return [
    sys.executable,
    "-m",
    "experiments.train",
    "--config=experiments/configs/digit.py",
    f"--workdir={run_dir}",
    *args,
  ]


def strip(metrics: dict) -> dict:
  """metrics.json without the figures that differ between two runs of one config."""
  return {k: v for k, v in metrics.items() if k not in TIMING}


def case_config(mnist_dir, name, **scene):
  """A scene case (experiments/configs/NAME.py) in seconds: 64x64, 3 steps of batch 8, no
  validation scenes drawn (`num_plot=0`; a test that looks at predictions.png or heatmap.png
  asks for them)."""
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  config.update(
    dict(
      mnist_dir=mnist_dir,
      epochs=1,
      steps_per_epoch=3,
      batch_size=8,
      num_val=24,
      log_every=3,
      num_plot=0,
      canvas_size=64,
    )
  )
  config.scene.update(scene)
  return config


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
  """A folder that every pytest-xdist worker of this session sees (the workers' common
  parent folder; the session's own folder without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared_once(shared_dir, name: str, make) -> tuple:
  """(folder, value): `make(folder)`, whose value is JSON, done once per session in
  shared_dir/name by whichever worker asks first; the others wait for it, then read its
  value. For what tests only read (a test that changes the folder's files copies them first)."""
  folder = shared_dir / name
  folder.mkdir(exist_ok=True)
  value = folder / "value.json"
  with open(folder / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not value.exists():
      value.write_text(json.dumps(make(folder)))
  return folder, json.loads(value.read_text())


def shared_run(shared_dir, name: str, config) -> tuple:
  """(workdir, final figures) of `config` trained once per session into shared_dir/name/run
  (`shared_once`)."""
  folder, figures = shared_once(shared_dir, name, lambda f: train_run(config, f / "run"))
  return folder / "run", figures


def shared_commands(shared_dir, name: str, *commands) -> tuple:
  """(shared_dir/name/run, [CompletedProcess]): the commands run once per session, in order,
  each given the workdir (`shared_once`); `commands`: functions of the workdir that run one."""

  def make(folder):
    procs = [command(folder / "run") for command in commands]
    return [[p.args, p.returncode, p.stdout, p.stderr] for p in procs]

  folder, procs = shared_once(shared_dir, name, make)
  return folder / "run", [subprocess.CompletedProcess(*p) for p in procs]


@pytest.fixture(scope="session")
def smoke_run(mnist_dir, shared_dir):
  """(workdir, final figures) of the smoke config (its predictions.png drawn), trained once
  for every test that only reads a finished run."""
  return shared_run(shared_dir, "smoke", small_config(mnist_dir, num_plot=4))


@pytest.fixture(scope="session")
def seed1_run(mnist_dir, shared_dir):
  """(workdir, final figures) of the smoke config with seed 1, trained once."""
  return shared_run(shared_dir, "smoke-seed1", small_config(mnist_dir, seed=1))


def long_config(mnist_dir: str):
  """The smoke config at 40 steps, one per call, a record every 5 and a checkpoint at 30:
  long enough that a signal soon after the first record lands in it."""
  return small_config(
    mnist_dir, epochs=1, steps_per_epoch=40, log_every=5, checkpoint_every=30, steps_per_call=1
  )


@pytest.fixture(scope="session")
def long_run(mnist_dir, shared_dir):
  """(workdir, final figures) of `long_config`, trained once: the uninterrupted run that the
  tests stopping such a run compare with."""
  return shared_run(shared_dir, "long", long_config(mnist_dir))


@pytest.fixture(scope="session")
def dense_run(mnist_dir, shared_dir):
  """(workdir, final figures) of case 4 (`multi`) with the dense detector (`case_config`,
  its predictions.png and heatmap.png drawn)."""
  return shared_run(shared_dir, "dense", dense_config(mnist_dir))


def dense_config(mnist_dir):
  """`dense_run`'s config: `case_config` of `multi`, drawing 4 validation scenes."""
  config = case_config(mnist_dir, "multi")
  config.num_plot = 4
  return config
