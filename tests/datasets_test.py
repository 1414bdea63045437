"""Datasets on disk: export and read back in both formats, bad data, training on a stored
set (exact resume after SIGKILL), evaluate --data."""

import importlib
import json
import os
import pathlib
import shutil
import sys

import conftest
import numpy as np
import pytest
from conftest import strip, train_run

from jaxloc import configs, datasets, loaders, workdir
from jaxloc.errors import UserError


def _config(mnist_dir, name="detect", **fields):
  """A small scene config: 64x64 canvases, up to 5 digits of 12-24 px, ink boxes, no
  validation scenes drawn unless `fields` ask."""
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  config.update(
    dict(mnist_dir=mnist_dir, epochs=1, steps_per_epoch=4, batch_size=8, num_val=24),
    log_every=2,
    num_plot=0,
    canvas_size=64,
    checkpoint_every=2,
  )
  config.scene.update(size_range=(12, 24), box_type="ink", paste_mode="add", max_overlap=0.25)
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def exported(mnist_dir, tmp_path_factory):
  """12 scenes written in both formats, and the arrays they were written from."""
  out = str(tmp_path_factory.mktemp("export") / "set")
  data = loaders.export_scenes(configs.read(_config(mnist_dir)), 12, "test", seed=0)
  datasets.write(out, data)
  return out, data


def test_export_reads_back_to_the_pixel_in_both_formats(exported):
  out, data = exported
  assert sorted(os.listdir(out)) == ["annotations.json", "images", "labels"]
  from_folder = datasets.read(out)
  from_coco = datasets.read(out, "coco")
  from_json = datasets.read(os.path.join(out, datasets.COCO_FILE))
  for read in (from_folder, from_coco, from_json):
    np.testing.assert_array_equal(read.images, data.images)
    k = read.valid.shape[1]
    assert k == data.valid.sum(1).max()  # K = the largest count in the set
    np.testing.assert_array_equal(read.valid, data.valid[:, :k])
    np.testing.assert_array_equal(read.label, data.label[:, :k])
    np.testing.assert_array_equal(np.rint(read.box * 64), np.rint(data.box[:, :k] * 64))
    np.testing.assert_allclose(read.box, data.box[:, :k], atol=1e-6)  # ink boxes: whole pixels
  with open(os.path.join(out, "labels", "0.txt")) as f:
    assert f.readline().strip() == datasets.HEADER


def _coco_with(out, tmp_path, json_rel: str, image_dir_rel: str, file_name) -> str:
  """The exported set's COCO file at tmp_path/json_rel, its PNGs in tmp_path/image_dir_rel,
  each image's `file_name` given by `file_name(i)`."""
  coco = json.loads((pathlib.Path(out) / datasets.COCO_FILE).read_text())
  json_path, image_dir = tmp_path / json_rel, tmp_path / image_dir_rel
  json_path.parent.mkdir(parents=True, exist_ok=True)
  image_dir.mkdir(parents=True, exist_ok=True)
  for im in coco["images"]:
    shutil.copy(pathlib.Path(out) / im["file_name"], image_dir / f"{im['id']}.png")
    im["file_name"] = file_name(im["id"])
  json_path.write_text(json.dumps(coco))
  return str(json_path)


def test_coco_images_are_found_as_people_keep_them(exported, tmp_path):
  """Beside the JSON (`write`'s own layout, tested above), in images/ beside it, or in a
  folder of their own given as the image root (COCO's annotations/ + val2017/)."""
  out, _ = exported
  folder = datasets.read(out)  # the generator's folder of the same scenes
  in_images = _coco_with(out, tmp_path / "a", "annotations.json", "images", "{}.png".format)
  apart = _coco_with(out, tmp_path / "b", "annotations/instances_val.json", "val", "{}.png".format)
  for read in (
    datasets.read(in_images),
    datasets.read(apart, image_root=str(tmp_path / "b" / "val")),
  ):
    for a, b in zip(read, folder, strict=True):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(UserError) as error:
    datasets.read(apart)
  beside, images = (
    tmp_path / "b" / "annotations" / "0.png",
    tmp_path / "b" / "annotations" / "images" / "0.png",
  )
  assert str(error.value) == (
    f"{apart}: image '0.png' not found at {beside} or {images}; give the folder that holds the "
    "images (evaluate --image_root, config.data.image_root)"
  )


def test_a_scene_config_reads_its_coco_images_from_its_image_root(exported, mnist_dir, tmp_path):
  out, _ = exported
  apart = _coco_with(out, tmp_path, "annotations/instances_val.json", "val", "{}.png".format)
  spec = configs.read(
    _config(mnist_dir, data={"val_path": apart, "image_root": str(tmp_path / "val")})
  )
  val = loaders.load(spec)[2]
  np.testing.assert_array_equal(val["images"], datasets.read(out).images)


def test_the_same_seed_gives_the_same_files(mnist_dir, tmp_path):
  for name in ("a", "b"):
    datasets.write(
      str(tmp_path / name), loaders.export_scenes(configs.read(_config(mnist_dir)), 5, "train", 3)
    )
  for sub in ("labels/0.txt", "labels/4.txt", "images/2.png", "annotations.json"):
    assert (tmp_path / "a" / sub).read_bytes() == (tmp_path / "b" / sub).read_bytes(), sub


def _copy(src, dst):
  import shutil

  shutil.copytree(src, dst)
  return str(dst)


def _write(path, text):
  with open(path, "w") as f:
    f.write(text)


@pytest.mark.parametrize(
  "damage,match",
  [
    (lambda d: os.remove(f"{d}/labels/3.txt"), "labels/3.txt: missing \\(its image exists\\)"),
    (lambda d: os.remove(f"{d}/images/3.png"), "images/3.png: missing \\(its label file exists\\)"),
    (
      lambda d: _write(f"{d}/labels/2.txt", "label,xmin,ymin,xmax,ymax\n3,1,2,x,9\n"),
      "2.txt, line 2",
    ),
    (lambda d: _write(f"{d}/labels/2.txt", "3,1,2,8,9\n"), "2.txt: line 1 must be the header"),
    (
      lambda d: _write(f"{d}/labels/2.txt", f"{datasets.HEADER}\n3,50,2,70,9\n"),
      "outside the 64x64",
    ),
    (
      lambda d: _write(f"{d}/labels/2.txt", f"{datasets.HEADER}\n3,5,2,5,9\n"),
      "is empty or outside",
    ),
    (
      lambda d: _write(f"{d}/labels/2.txt", f"{datasets.HEADER}\n12,5,2,9,9\n"),
      "class 12 of digit 1",
    ),
    (lambda d: _write(f"{d}/images/1.png", "not a png"), "images/1.png: not a readable image"),
    (
      lambda d: __import__("PIL.Image").Image.new("L", (32, 32)).save(f"{d}/images/5.png"),
      "images/5.png: 32x32 pixels, but .*0.png is 64x64",
    ),
  ],
  ids=[
    "no_label",
    "no_image",
    "bad_line",
    "no_header",
    "outside",
    "zero_size",
    "class",
    "bad_png",
    "size",
  ],
)
def test_bad_mnist_detection_folders_are_one_error_naming_the_file(
  exported, tmp_path, damage, match
):
  d = _copy(exported[0], tmp_path / "set")
  damage(d)
  with pytest.raises(UserError, match=match):
    datasets.read(d)


def test_bad_coco_files_and_empty_folders(exported, tmp_path):
  d = _copy(exported[0], tmp_path / "set")
  coco = json.load(open(f"{d}/{datasets.COCO_FILE}"))
  coco["annotations"][0]["image_id"] = 99
  _write(f"{d}/{datasets.COCO_FILE}", json.dumps(coco))
  with pytest.raises(UserError, match="annotations.json: an annotation refers to image_id 99"):
    datasets.read(d, "coco")
  _write(f"{d}/{datasets.COCO_FILE}", "{}")
  with pytest.raises(UserError, match="annotations.json: not a COCO detection file"):
    datasets.read(d, "coco")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(UserError, match="neither an MNIST-detection folder"):
    datasets.read(str(tmp_path / "empty"))
  os.makedirs(tmp_path / "bare" / "images")
  os.makedirs(tmp_path / "bare" / "labels")
  with pytest.raises(UserError, match="bare: the dataset holds no images"):
    datasets.read(str(tmp_path / "bare"))
  with pytest.raises(UserError, match="exists and is not empty"):
    datasets.write(d, exported[1])


def test_bad_data_stops_train_with_one_error_and_writes_nothing(exported, mnist_dir, tmp_path):
  """A damaged training set, and a validation set of another canvas size, are one error
  before the workdir is made (the train command prints it as one line: train_test)."""
  d = _copy(exported[0], tmp_path / "set")
  _write(f"{d}/labels/2.txt", f"{datasets.HEADER}\n3,5,2,5,9\n")
  run = tmp_path / "run"
  with pytest.raises(UserError, match=r"labels/2.txt.*is empty or outside"):
    train_run(_config(mnist_dir, data={"train_path": d}), str(run))
  assert not run.exists()
  config = importlib.import_module("experiments.configs.detect").get_config()
  config.mnist_dir, config.data.val_path = mnist_dir, exported[0]
  with pytest.raises(UserError, match="holds 64x64 images but config.canvas_size=128"):
    train_run(config, str(run))
  assert not run.exists()


def test_training_on_a_stored_set_resumes_exactly_after_sigkill(mnist_dir, exported, tmp_path):
  out, _ = exported
  config = _config(mnist_dir, epochs=2, steps_per_epoch=4)
  config.data.train_path = config.data.val_path = out
  reference = train_run(config, str(tmp_path / "ref"))
  assert reference["num_val"] == 12  # the whole stored set (num_val 24 > 12)
  run = tmp_path / "killed"
  args = [
    "--config=experiments/configs/detect.py",
    f"--workdir={run}",
    f"--config.mnist_dir={mnist_dir}",
    "--config.epochs=2",
    "--config.steps_per_epoch=4",
    "--config.batch_size=8",
    "--config.num_val=24",
    "--config.log_every=2",
    "--config.num_plot=0",
    "--config.canvas_size=64",
    "--config.checkpoint_every=2",
    "--config.scene.size_range=(12,24)",
    "--config.scene.box_type=ink",
    "--config.scene.paste_mode=add",
    "--config.scene.max_overlap=0.25",
    f"--config.data.train_path={out}",
    f"--config.data.val_path={out}",
  ]
  cmd = [sys.executable, "-m", "experiments.train", *args]
  conftest.kill_after_first_checkpoint(cmd, run)
  resumed = train_run(config, str(run))
  assert resumed["resumed_from_step"] is not None and resumed["resumed_from_step"] < 8
  assert (run / workdir.PARAMS).read_bytes() == (tmp_path / "ref" / workdir.PARAMS).read_bytes()
  assert strip(resumed) == strip(reference)


def test_evaluate_on_exported_validation_scenes_reproduces_the_run(mnist_dir, tmp_path):
  config = _config(mnist_dir, num_plot=4)  # evaluate draws the run's num_plot scenes
  run = tmp_path / "run"
  final = train_run(config, str(run))
  own = sorted(os.listdir(run))
  data = tmp_path / "val"
  proc = conftest.run_command(
    "experiments.export",
    "--config=experiments/configs/detect.py",
    f"--config.mnist_dir={mnist_dir}",
    "--config.canvas_size=64",
    "--config.scene.size_range=(12,24)",
    "--config.scene.box_type=ink",
    "--config.scene.paste_mode=add",
    "--config.scene.max_overlap=0.25",
    f"--out={data}",
    "--num=24",
    "--split=test",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = conftest.run_command("experiments.evaluate", f"--workdir={run}", f"--data={data}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert sorted(os.listdir(run)) == sorted(own + ["eval-val"])  # the run's own files as they were
  scored = workdir.read_json(str(run / "eval-val" / workdir.METRICS))
  assert set(final) <= set(scored) and scored["num_val"] == 24
  for key in ("AP", "AP50", "AP75"):
    assert abs(scored[key] - final[key]) <= 1e-3, (key, scored[key], final[key])
  for name in ("predictions.png", "detections.json", "ground_truth.json", "pr.png"):
    assert (run / "eval-val" / name).exists(), name
  pytest.importorskip("pycocotools")
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  gt = COCO(str(run / "eval-val" / "ground_truth.json"))
  coco = COCOeval(gt, gt.loadRes(str(run / "eval-val" / "detections.json")), "bbox")
  coco.evaluate()
  coco.accumulate()
  coco.summarize()
  assert abs(coco.stats[1] - scored["AP50"]) < 1e-6 and abs(coco.stats[0] - scored["AP"]) < 1e-6
  small = tmp_path / "small"
  with pytest.raises(UserError, match=f"dataset {str(small)!r} not found"):
    loaders.load_set(str(small), configs.read(config))  # what evaluate --data reads
  proc = conftest.run_command("experiments.evaluate", f"--workdir={run}", f"--image_root={small}")
  assert proc.returncode == 2 and "--image_root is where a dataset's images are" in proc.stderr
