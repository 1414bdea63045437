"""The inference API, and the evaluate / predict / font_digits commands on a trained workdir."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, run_command, small_config
from flax import serialization
from PIL import Image

from jaxloc import configs, images, inference, mnist, model, tasks, workdir
from jaxloc.errors import UserError


@pytest.fixture
def trained(smoke_run):
  """The session's smoke run: (workdir, final figures)."""
  return str(smoke_run[0]), smoke_run[1]


def test_predictor_outputs(trained):
  predict = inference.Predictor.from_workdir(trained[0])
  x = np.zeros((3, 75, 75), np.uint8)
  x[:, 10:38, 20:48] = 200
  out = predict(x)
  assert out["label"].shape == (3,) and out["label"].dtype == np.int32
  assert out["probs"].shape == (3, 10)
  np.testing.assert_allclose(out["probs"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["score"], out["probs"].max(-1))
  assert out["box"].shape == (3, 4) and out["box_px"].shape == (3, 4)
  np.testing.assert_allclose(out["box_px"], out["box"] * 75, rtol=1e-6)
  # The same canvases as float [0,1], with a channel axis, or as a JAX array.
  for same in (x / 255.0, (x / 255.0)[..., None].astype(np.float32), jnp.asarray(x)):
    np.testing.assert_allclose(predict(same)["probs"], out["probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "bad,match",
  [
    (np.zeros((2, 28, 28), np.uint8), r"shape \(2, 28, 28\); this model takes \[N,75,75\]"),
    (np.zeros((75, 75), np.uint8), r"shape \(75, 75\)"),
    (np.zeros((2, 75, 75, 3), np.uint8), r"shape \(2, 75, 75, 3\)"),
    (np.zeros((0, 75, 75), np.uint8), "empty batch"),
    (np.zeros((2, 75, 75), np.int64), "dtype int64; use uint8"),
    (np.full((2, 75, 75), 255.0, np.float32), r"must lie in \[0, 1\].*divide uint8 pixels by 255"),
    (np.full((2, 75, 75), np.nan, np.float32), r"must lie in \[0, 1\]"),
    ([[0.0]], "must be a numpy or JAX array"),
  ],
)
def test_predictor_rejects_bad_images(trained, bad, match):
  with pytest.raises(UserError, match=match):
    inference.Predictor.from_workdir(trained[0])(bad)


def test_from_workdir_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    inference.Predictor.from_workdir(str(tmp_path / "nope"))
  with pytest.raises(UserError, match="not a jaxloc workdir"):
    inference.Predictor.from_workdir(str(tmp_path))
  workdir.write_json(str(tmp_path / "config.json"), small_config("").to_dict())
  with pytest.raises(UserError, match="has not finished training"):
    inference.Predictor.from_workdir(str(tmp_path))
  (tmp_path / "params.msgpack").write_bytes(b"garbage")
  with pytest.raises(UserError, match="cannot be read"):
    inference.Predictor.from_workdir(str(tmp_path))
  other = small_config("", dense_features=64)  # another model: same names, other shapes
  params = model.init_params(
    jax.random.key(0), tasks.build(configs.read(other)).model, other.canvas_size
  )
  (tmp_path / "params.msgpack").write_bytes(serialization.to_bytes(params))
  with pytest.raises(
    UserError, match=r"\['Dense_0'\]\['bias'\] has shape \(64,\) where .* makes \(128,\)"
  ):
    inference.Predictor.from_workdir(str(tmp_path))


def test_a_damaged_params_file_is_one_line(trained, tmp_path):
  """The predict command's; evaluate reads the workdir through the same
  `Predictor.from_workdir` (test_from_workdir_errors), its one-line exit datasets_test's."""
  run = tmp_path / "run"
  shutil.copytree(trained[0], run)
  params = (run / workdir.PARAMS).read_bytes()
  (run / workdir.PARAMS).write_bytes(params[: len(params) // 2])  # a copy cut short
  proc = run_command("experiments.predict", f"--workdir={run}", str(run / "predictions.png"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().startswith("error: ") and "cannot be read" in proc.stderr


def test_evaluate_reproduces_the_training_metrics(trained, mnist_dir):
  run, final = trained
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.evaluate", f"--workdir={run}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  scored = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{") :])[0]
  for key in ("accuracy", "mean_iou", "median_iou", "iou_at_0_6", "class_loss", "box_loss"):
    assert scored[key] == final[key], key
  on_disk = workdir.read_json(f"{run}/metrics.json")
  assert on_disk["train_images_per_s"] == final["train_images_per_s"]


def _handwritten_png(path, digit, size=(60, 90)):
  """A digit drawn as dark ink on white paper, larger than MNIST's 28x28."""
  arr = np.full(size, 255, np.uint8)
  glyph = np.asarray(Image.fromarray(digit).resize((40, 40)))
  arr[10:50, 25:65] = 255 - glyph
  Image.fromarray(arr).convert("RGB").save(path)


def test_predict_writes_an_image_and_keeps_its_programs(trained, mnist_dir, tmp_path):
  """The predict command on a handwritten PNG. Its compiled programs land in
  ~/.cache/jaxloc/xla ($HOME set apart) unless --compilation_cache= turns the cache off."""
  x, _ = mnist.load("test", mnist_dir=mnist_dir)
  png = tmp_path / "mine.png"
  _handwritten_png(png, x[0])
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  for name, extra in (("on", []), ("off", ["--compilation_cache="])):
    env["HOME"] = str(tmp_path / name)
    out = tmp_path / name / "out.png"
    cmd = ["-m", "experiments.predict", f"--workdir={trained[0]}", str(png), f"--out={out}"]
    proc = subprocess.run(
      [sys.executable, *cmd, *extra], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mine.png: digit" in proc.stdout
    assert Image.open(out).size[0] > 100
  cache = tmp_path / "on" / ".cache" / "jaxloc" / "xla"
  assert cache.is_dir() and len(os.listdir(cache)) >= 1  # the model's forward pass
  assert not (tmp_path / "off" / ".cache" / "jaxloc").exists()
  with pytest.raises(UserError, match="image 'nope.png' not found"):  # what predict reads with
    images.canvas_from_file("nope.png", 75)


def test_image_files_become_canvases(tmp_path):
  digit = np.zeros((28, 28), np.uint8)
  digit[5:20, 10:14] = 255
  canvas, (x0, y0, scale) = images.to_canvas(digit, 75)
  assert (x0, y0, scale) == (23, 23, 1.0)
  np.testing.assert_array_equal(canvas[23:51, 23:51], digit)
  big = np.zeros((150, 100), np.uint8)
  canvas, (_, _, scale) = images.to_canvas(big, 75)
  assert canvas.shape == (75, 75) and scale == 0.5
  paper = 255 - digit  # dark ink on white is inverted
  np.testing.assert_array_equal(images.to_canvas(paper, 75)[0][23:51, 23:51], digit)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  with pytest.raises(UserError, match="not a readable image"):
    images.read_grey(str(tmp_path / "bad.png"))


def test_font_digits_command(trained):
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.font_digits", f"--workdir={trained[0]}", "--per_digit=2"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = workdir.read_json(f"{trained[0]}/font_digits.json")
  assert summary["num_val"] == 120 and 0.0 <= summary["accuracy"] <= 1.0
