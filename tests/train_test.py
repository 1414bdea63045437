import gc
import json
import os
import re
import subprocess
import sys
import threading

import conftest
import jax
import pytest
from conftest import small_config, train_run

import experiments
from jaxloc import configs, plots, tasks, workdir
from jaxloc.errors import UserError


def test_same_seed_same_parameters(mnist_dir, tmp_path, smoke_run, seed1_run):
  """The same seed gives the same parameters, whether the run draws its validation canvases
  (the smoke run, num_plot 4) or not (num_plot 0: no predictions.png)."""
  a_dir, a = smoke_run
  b = train_run(small_config(mnist_dir), str(tmp_path / "b"))
  assert (a_dir / "predictions.png").exists() and not (tmp_path / "b" / "predictions.png").exists()
  pa = (a_dir / workdir.PARAMS).read_bytes()
  assert (tmp_path / "b" / workdir.PARAMS).read_bytes() == pa
  assert a["accuracy"] == b["accuracy"] and a["mean_iou"] == b["mean_iou"]
  c_dir, c = seed1_run
  assert (c_dir / workdir.PARAMS).read_bytes() != pa
  assert c["num_val"] == 40


def test_end_to_end_run_writes_every_output(mnist_dir, tmp_path, smoke_run):
  run, final = smoke_run
  for name in (
    "config.json",
    "metrics.jsonl",
    "params.msgpack",
    "metrics.json",
    "curves.png",
    "predictions.png",
  ):
    assert (run / name).stat().st_size > 0, name
  on_disk = workdir.read_json(str(run / "metrics.json"))
  assert on_disk == json.loads(json.dumps(final))
  for key in (
    "accuracy",
    "mean_iou",
    "median_iou",
    "iou_at_0_6",
    "num_params",
    "train_images_per_s",
    "wall_s",
  ):
    assert key in on_disk
  assert on_disk["num_params"] == 426_638 and on_disk["steps"] == 6
  records = workdir.read_jsonl(str(run / "metrics.jsonl"))
  evals = [r for r in records if "val/accuracy" in r]
  assert [r["epoch"] for r in evals] == [1, 2]
  assert [r["step"] for r in records if "val/accuracy" not in r] == [3, 6]  # log_every 3
  assert workdir.read_json(str(run / "config.json"))["batch_size"] == 8
  # With a moving average (the default) the raw weights are scored too, beside it.
  assert {f"val_raw/{k}" for k in on_disk["raw"]} == {k for k in evals[-1] if "val_raw/" in k}
  assert on_disk["raw"]["num_val"] == on_disk["num_val"] == 40
  plain = train_run(small_config(mnist_dir, ema_decay=0.0), str(tmp_path / "plain"))
  assert "raw" not in plain
  assert plain["accuracy"] == on_disk["raw"]["accuracy"]
  assert plain["mean_iou"] == pytest.approx(on_disk["raw"]["mean_iou"], rel=1e-6)


def test_predictions_are_drawn_off_the_training_thread(mnist_dir, tmp_path, monkeypatch):
  """predictions.png is drawn on the drawing thread (a finished run has it:
  test_end_to_end_run_writes_every_output); a failed drawing is one UserError by the end of
  training, and the checkpoints stay."""
  threads = []

  def full_disk(*args, **kwargs):
    threads.append(threading.current_thread().name)
    raise OSError(28, "No space left on device", os.path.join(str(tmp_path), "predictions.png"))

  monkeypatch.setattr(plots, "plot_predictions", full_disk)
  with pytest.raises(UserError, match=r"cannot write .*predictions.png \(No space left"):
    train_run(small_config(mnist_dir, num_plot=4), str(tmp_path / "full"))
  assert threads and all(t.startswith("jaxloc-draw") for t in threads), threads
  assert os.listdir(tmp_path / "full" / "checkpoints") == ["6"]


def test_cosine_run_refuses_more_epochs(mnist_dir, tmp_path):
  """Its schedule is laid out over the epochs: more of them would change the past."""
  config = small_config(mnist_dir, lr_schedule="cosine", warmup_steps=1, epochs=1)
  train_run(config, str(tmp_path / "run"))
  config.epochs = 2
  with pytest.raises(UserError, match="epochs: 1 -> 2"):
    train_run(config, str(tmp_path / "run"))
  config.epochs = 1
  with pytest.raises(UserError, match="its cosine learning-rate schedule has ended"):
    train_run(config, str(tmp_path / "run"))


def test_a_command_pauses_the_garbage_collector_only_while_it_imports():
  """`python -m experiments.<command>` imports the package with sys.argv[0] "-m": the
  collector waits during the imports; `cli.run` freezes their objects and turns it back on.
  Imported any other way (this process), the package leaves the collector alone."""
  assert gc.isenabled() and not experiments.GC_PAUSED
  code = (
    "import gc, sys\n"
    "sys.argv = ['-m']\n"  # as Python sets it while it finds a command's module
    "import experiments\n"
    "paused = not gc.isenabled()\n"
    "from experiments import cli\n"
    "sys.argv = ['command']\n"
    "cli.run(lambda argv: print(paused, gc.isenabled(), gc.get_freeze_count() > 0))\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=conftest.ROOT, capture_output=True)
  assert proc.returncode == 0 and proc.stdout.decode().split() == ["True"] * 3, proc.stderr


def test_a_signal_while_a_command_exits_ends_it_with_its_status_and_no_traceback():
  """A stopped run's second Ctrl-C can land in the exit handlers (`cli._exit`): the process
  ends at once with the stop's status (130), not with a traceback of the handler it hit."""
  code = (
    "import atexit, os, signal, sys, time\n"
    "from experiments import cli\n"
    "from jaxloc.errors import Stopped\n"
    "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(5)))\n"
    "sys.argv = ['command']\n"
    "def main(argv):\n"
    "  raise Stopped('stopped by SIGINT at step 3 of 9', 130)\n"
    "cli.run(main)\n"
  )
  proc = subprocess.run([sys.executable, "-c", code], cwd=conftest.ROOT, capture_output=True)
  err = proc.stderr.decode()
  assert proc.returncode == 130 and "Traceback" not in err, err
  assert err.startswith("stopped by SIGINT at step 3 of 9"), err


@pytest.mark.parametrize(
  "override,match",
  [
    ("--config.batch_sise=3", "unknown config field 'batch_sise'. Did you mean \"batch_size\""),
    ("--num_processes=2", "--num_processes, --process_id need --distributed"),
    ("--distributed", "could not start the distributed run (ValueError: coordinator_address"),
  ],
)
def test_command_line_flag_errors(override, match, tmp_path):
  """The train command's mistakes are one line and exit 2: a flag's (the others are
  `test_flag_and_override_mistakes_are_one_error`'s, a config's configs_test's) and those
  of the distributed flags."""
  config = "--config=experiments/configs/digit.py"
  proc = conftest.run_train_command(config, f"--workdir={tmp_path}/run", override)
  assert proc.returncode == 2, proc.stderr
  assert match in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
  "override,match",
  [
    ("--config.batch_sise=3", "unknown config field 'batch_sise'. Did you mean \"batch_size\""),
    ("--config.batch_size=abc", "invalid literal for int"),
    ("--config=experiments/configs/missing.py", "cannot load --config=experiments/configs/missing"),
    ("--nope=1", "Unknown command line flag 'nope'"),
  ],
)
def test_flag_and_override_mistakes_are_one_error(override, match, monkeypatch):
  from absl import flags
  from ml_collections import config_flags

  from experiments import cli

  monkeypatch.chdir(conftest.ROOT)
  argv = ["train", "--config=experiments/configs/digit.py", override]
  flag_values = flags.FlagValues()  # the train command's --config, apart from absl's FLAGS
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  with pytest.raises(UserError, match=re.escape(match)):
    cli.parse_flags(argv, flag_values)


@pytest.mark.parametrize(
  "module,args,match",
  [
    ("experiments.run_cases", ["--cases=multi,nope"], "unknown cases ['nope']; choose from"),
    ("experiments.benchmark", ["--parts=nope"], "unknown part 'nope'; choose from"),
    ("experiments.benchmark", ["--parts=matmul", "--rounds=0"], "--rounds=0: give 1 or more"),
  ],
)
def test_experiment_script_errors(module, args, match, tmp_path):
  root = [f"--root={tmp_path}/cases"] if module == "experiments.run_cases" else []
  proc = conftest.run_command(module, *root, *args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert match in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "cases").exists()


@pytest.mark.parametrize(
  "item,match",
  [
    ("dense.no_such=1", "expected field=value with an existing"),
    ("batch_size", "expected field=value with an existing"),
    ("dense.context_features=7", "Could not override field"),
  ],
)
def test_run_cases_set_errors(item, match):
  from experiments import cli
  from experiments.configs import multi

  with pytest.raises(UserError, match=match):
    cli.override(multi.get_config(), [item])


def test_a_spec_trained_again_in_one_process_is_not_traced_again(mnist_dir, tmp_path):
  """`tasks.build` gives specs that differ only in what the programs do not read (the seed,
  the run's length, the steps a call runs (above one), the moving average's decay, the
  validation count) one model and the same functions, static arguments of the jitted train
  steps, metric shapes and evaluation: a second such run traces nothing."""
  traced = []

  def listen(event, seconds, **kwargs):
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traced.append(kwargs.get("fun_name"))

  first_config = small_config(mnist_dir, batch_size=2, num_val=12, epochs=1)
  second_config = small_config(
    mnist_dir, batch_size=2, num_val=12, seed=1, ema_decay=0.99, steps_per_epoch=4, log_every=2
  )  # calls of 2 steps, the first run's of 3
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    train_run(first_config, tmp_path / "first")
    first, traced[:] = list(traced), []
    train_run(second_config, tmp_path / "second")
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  # Batches of 2 and 12 validation canvases: shapes no other test uses, so the first run
  # traced its metric shapes, steps and evaluation here (its initial state has the smoke
  # model's shapes, which a test run before it in this process may have traced).
  assert {"_step_metrics", "_jitted_train_steps", "eval_step"} <= set(first), first
  assert traced == []
  spec = configs.read(first_config)
  reseeded = small_config(mnist_dir, batch_size=2, num_val=12, epochs=1, seed=1)
  assert tasks.build(spec) is tasks.build(configs.read(reseeded))
  other = tasks.build(configs.read(small_config(mnist_dir, batch_size=2, num_val=40)))
  for part in ("model", "sample_fn", "loss_fn"):
    assert getattr(other, part) is getattr(tasks.build(spec), part), part
  assert tasks.build(spec) is not tasks.build(configs.read(small_config(mnist_dir, batch_size=4)))
