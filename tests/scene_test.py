"""Multi-digit scenes: masks and counts, boxes, overlap, empty canvases, config errors."""

import functools

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_config, train_run
from PIL import Image

from jaxloc import boxes, canvas, configs, inference, loaders, mnist, scenes, tasks
from jaxloc.errors import UserError


def _digits(mnist_dir):
  x, y = mnist.load("train", mnist_dir=mnist_dir)
  return jnp.asarray(x[:2000]), jnp.asarray(y[:2000])


@pytest.fixture(scope="module")
def digits(mnist_dir):
  return _digits(mnist_dir)


def _scene(digits, **kw):
  args = dict(batch_size=256, canvas_size=128, max_objects=2, count_probs=(1 / 3, 1 / 3, 1 / 3))
  args.update(kw)
  return jax.device_get(scenes.sample_scene(jax.random.key(0), *digits, **args))


def test_mask_and_count_consistent(digits):
  s = _scene(digits)
  assert s["valid"].shape == (256, 2) and s["box"].shape == (256, 2, 4)
  np.testing.assert_array_equal(s["count"], s["valid"].sum(1))
  assert set(np.unique(s["count"])) == {0, 1, 2}
  # valid slots come first; empty slots hold zeros, never NaN
  assert not np.any(~s["valid"][:, 0] & s["valid"][:, 1])
  assert np.all(s["box"][~s["valid"]] == 0) and np.all(s["label"][~s["valid"]] == 0)
  assert np.isfinite(s["box"]).all()


def test_empty_canvases_are_all_zeros(digits):
  s = _scene(digits)
  empty = s["count"] == 0
  assert empty.any() and not s["image"][empty].any()


def test_boxes_contain_every_pixel_and_no_overlap(digits):
  for box_type in ("patch", "tight", "ink"):
    s = _scene(digits, box_type=box_type, size_range=(20, 36) if box_type == "ink" else (28, 28))
    for i in range(256):
      image = s["image"][i, :, :, 0].copy()
      for b in s["box"][i][s["valid"][i]]:
        x0, y0, x1, y1 = np.rint(b * 128).astype(int)
        image[y0:y1, x0:x1] = 0
      assert not image.any(), f"ink outside the boxes ({box_type})"
    both = s["valid"].all(1)
    iou = boxes.iou(jnp.asarray(s["box"][both, 0]), jnp.asarray(s["box"][both, 1]))
    assert float(iou.max()) == 0.0


def test_ink_boxes_are_the_resized_digits_pixels(digits):
  """box_type "ink": each box is the whole-pixel extent of its digit's ink on the canvas
  (every edge row and column of the box holds ink; nothing of the digit lies outside)."""
  args = dict(batch_size=64, canvas_size=128, max_objects=2, count_probs=(0, 0, 1))
  args.update(size_range=(15, 60), box_type="ink", max_overlap=1.0)
  key = jax.random.key(4)
  s = jax.device_get(scenes.sample_scene(key, *digits, **args))
  alone = jax.device_get(scenes.sample_scene(key, *digits, **dict(args, count_probs=(0, 1, 0))))
  for i in range(64):  # the first digit drawn alone: its own canvas
    if not alone["valid"][i, 0]:
      continue
    x0, y0, x1, y1 = np.rint(alone["box"][i, 0] * 128).astype(int)
    ink = alone["image"][i, :, :, 0] > 0
    assert ink[y0:y1, x0:x1].sum() == ink.sum()
    assert ink[y0:y1, x0].any() and ink[y0:y1, x1 - 1].any()
    assert ink[y0, x0:x1].any() and ink[y1 - 1, x0:x1].any()
  assert np.all(np.rint(s["box"] * 128) == s["box"] * 128)  # whole pixels (to float error)


def test_additive_paste_sums_overlapping_digits_and_clips_at_one():
  digit = jnp.full((1, 2, 28, 28), 100, jnp.uint8)
  xy, size, valid = jnp.array([[[0, 0], [10, 10]]]), jnp.full((1, 2), 28), jnp.ones((1, 2), bool)

  @functools.partial(jax.jit, static_argnums=1)
  def paste(digit, mode):  # the first canvas
    return canvas.combine(canvas.place_digits(digit, xy, size, valid, canvas_size=40), mode)[0]

  add, top = paste(digit, "add")[:, :, 0], paste(digit, "max")[:, :, 0]
  np.testing.assert_allclose(add[15, 15], 200 / 255, rtol=1e-6)  # both digits: the sum
  np.testing.assert_allclose(add[5, 5], 100 / 255, rtol=1e-6)  # one digit: unchanged
  assert float(top[15, 15]) == pytest.approx(100 / 255)
  bright = paste(digit * 2, "add")[:, :, 0]
  assert float(bright[15, 15]) == 1.0 and float(bright.max()) == 1.0  # 400 / 255 clipped


def test_targets_ordered_left_to_right(digits):
  s = _scene(digits)
  both = s["valid"].all(1)
  assert np.all(s["box"][both, 0, 0] <= s["box"][both, 1, 0])


def test_single_class_with_distractors(digits):
  s = _scene(
    digits,
    max_objects=1,
    count_probs=(0.5, 0.5),
    target_class=1,
    distractor_prob=0.5,
    batch_size=2000,
  )
  assert np.all(s["label"][s["valid"]] == 1)
  present = s["valid"][:, 0]
  has_ink = s["image"].reshape(2000, -1).max(1) > 0
  distractor = ~present & has_ink
  assert 0.45 < present.mean() < 0.55 and 0.2 < distractor.mean() < 0.3
  assert 0.2 < (~has_ink).mean() < 0.3


def test_many_digits_and_scales(digits):
  s = _scene(digits, max_objects=5, count_probs=(0, 0, 0, 0, 0, 1.0), size_range=(20, 36))
  assert s["count"].mean() > 4.95  # rejection rarely has to drop a digit
  widths = np.rint((s["box"][..., 2] - s["box"][..., 0]) * 128)[s["valid"]]
  assert widths.min() == 20 and widths.max() == 36


def test_same_key_same_scene(digits):
  a = _scene(digits)
  b = _scene(digits)
  np.testing.assert_array_equal(a["image"], b["image"])


def test_layout_that_cannot_fit_is_rejected():
  with pytest.raises(UserError, match="cannot be placed without overlap.*canvas_size >= 84"):
    scenes.check_scene(75, 5, 28, 0.0)
  with pytest.raises(UserError, match="do not fit"):
    scenes.check_scene(64, 1, 80, 0.0)
  scenes.check_scene(128, 5, 28, 0.0)
  scenes.check_scene(75, 5, 28, 0.3)


@pytest.mark.parametrize("head", ["dense", "slots"])
def test_scene_run_writes_outputs_and_coco_files_agree(mnist_dir, tmp_path, head, dense_run):
  from jaxloc import metrics, workdir

  config = dense_config(mnist_dir)
  config.head = head
  if head == "dense":  # the session's dense run is this config's
    run, final = dense_run
  else:
    run = tmp_path / "multi"
    final = train_run(config, str(run))
  for name in (
    "metrics.json",
    "predictions.png",
    "pr.png",
    "curves.png",
    "detections.json",
    "ground_truth.json",
    "params.msgpack",
  ):
    assert (run / name).stat().st_size > 0, name
  for key in (
    "count_accuracy",
    "presence_precision",
    "presence_recall",
    "class_accuracy",
    "mean_iou",
    "iou_at_0_6",
    "AP",
    "AP50",
    "AP75",
    "baseline_count_accuracy",
  ):
    assert 0.0 <= final[key] <= 1.0, key
  # The COCO files hold exactly what jaxloc scored: pycocotools gets the same AP.
  coco = pytest.importorskip("pycocotools.coco")
  cocoeval = pytest.importorskip("pycocotools.cocoeval")
  api = coco.COCO()
  api.dataset = workdir.read_json(str(run / "ground_truth.json"))
  api.createIndex()
  ev = cocoeval.COCOeval(api, api.loadRes(workdir.read_json(str(run / "detections.json"))), "bbox")
  ev.params.areaRng, ev.params.areaRngLbl = [[0, 1e10]], ["all"]
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  assert final["AP"] == pytest.approx(ev.stats[0], abs=1e-6)
  assert final["AP50"] == pytest.approx(ev.stats[1], abs=1e-6)
  assert metrics.IOU_THRESHOLD == 0.6
  # The inference API returns detections (top-k, or K slots) and the cases' answers.
  predictor = inference.Predictor.from_workdir(str(run))
  out = predictor(np.zeros((2, 64, 64), np.uint8))
  t = config.dense.top_k if head == "dense" else 2
  assert out["count"].shape == (2,) and out["box"].shape == (2, t, 4)
  assert out["box_px"].shape == (2, t, 4) and out["keep"].shape == (2, t)
  np.testing.assert_array_equal(out["count"], out["keep"].sum(1))
  assert out["presence"].dtype == bool and out["label"].shape == (2, t)
  assert (run / "heatmap.png").exists() == (head == "dense")
  # evaluate's figures are the run's (the command: inference_test's on a seed run,
  # datasets_test's with --data on a dense run); the other commands once, on the dense run
  task = tasks.build(predictor.spec)
  scored, _ = task.make_evaluator(task.model.apply)(
    predictor.variables, loaders.load(predictor.spec)[2]
  )
  for key in ("count_accuracy", "presence_accuracy", "mean_iou", "class_accuracy", "AP", "AP50"):
    assert scored[key] == final[key], key
  if head == "slots":
    proc = conftest.run_command("experiments.threshold", f"--workdir={run}")
    assert proc.returncode == 2 and "is not a run of the dense detector" in proc.stderr
    return
  # predict draws the detections of a scene file.
  scene = scenes.sample_scene(
    jax.random.key(3),
    *_digits(mnist_dir),
    **configs.read(config).scene.sample_args(1, config.canvas_size),
  )
  png = tmp_path / "scene.png"
  Image.fromarray(np.asarray(scene["image"][0, :, :, 0] * 255, np.uint8)).save(png)
  out_png = tmp_path / "out.png"
  proc = conftest.run_command(
    "experiments.predict", f"--workdir={run}", str(png), f"--out={out_png}"
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "scene.png: " in proc.stdout and " digit(s)" in proc.stdout and out_png.exists()
  # The threshold sweep on training scenes: dense runs only, numbers only.
  proc = conftest.run_command("experiments.threshold", f"--workdir={run}", "--thresholds=0.2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "threshold 0.2: " in proc.stdout and "the middle one: 0.2" in proc.stdout
  bad = conftest.run_command("experiments.threshold", f"--workdir={run}", "--thresholds=a")
  assert bad.returncode == 2 and "--thresholds=['a']: give numbers" in bad.stderr
