"""experiments/generator.py and outside_scenes.py: the benchmark generator's scenes in numpy."""

import conftest
import numpy as np

from experiments import generator


def test_resizing_to_28_keeps_the_digit_and_a_constant_stays_constant():
  rng = np.random.default_rng(0)
  digit = rng.integers(0, 256, (28, 28)).astype(np.float32)
  np.testing.assert_allclose(generator.resize_linear(digit, 28), digit, atol=1e-4)
  for side in (15, 57, 99):
    flat = generator.resize_linear(np.full((28, 28), 7.0, np.float32), side)
    assert flat.shape == (side, side)
    np.testing.assert_allclose(flat, 7.0, atol=1e-4)  # borders repeat (cv2), never fade


def test_scenes_follow_the_generator(mnist_dir):
  from jaxloc import mnist

  digits, labels = mnist.load("test", mnist_dir=mnist_dir)
  rng = np.random.default_rng(1)
  images, targets = generator.make_scenes(rng, digits[:500], labels[:500], 20, 0, 19)
  assert images.shape == (20, 300, 300) and images.dtype == np.uint8
  assert all(0 <= len(t) <= 19 for t in targets) and sum(map(len, targets)) > 50
  for image, objects in zip(images, targets, strict=True):
    rest = image.copy()
    for label, x0, y0, x1, y1 in objects:
      assert 0 <= label <= 9 and 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 300
      assert x1 - x0 <= 99 and y1 - y0 <= 99
      rest[y0:y1, x0:x1] = 0
    assert not rest.any(), "ink outside every box"


def test_score_of_answers_that_are_the_truth_and_of_wrong_classes(mnist_dir):
  from experiments import coco_eval
  from jaxloc import mnist

  digits, labels = mnist.load("test", mnist_dir=mnist_dir)
  images, targets = generator.make_scenes(np.random.default_rng(2), digits, labels, 6, 1, 5)

  def truth(shift):  # a Predictor answering every scene's digits, classes shifted by `shift`
    def predict(batch):
      t = np.zeros((len(batch), 8, 4), np.float32)
      out = dict(box=t, label=np.zeros((len(batch), 8), int), score=np.zeros((len(batch), 8)))
      out["keep"], out["count"] = out["score"] > 0, np.zeros(len(batch), int)
      for j, objects in enumerate(targets[: len(batch)]):
        for i, (label, *px) in enumerate(objects):
          out["box"][j, i] = np.array(px) / generator.CANVAS
          out["label"][j, i], out["score"][j, i] = (label + shift) % 10, 0.9
        out["keep"][j], out["count"][j] = out["score"][j] > 0, len(objects)
      return out

    return predict

  right = coco_eval.score_scenes(truth(0), images, targets, generator.CANVAS)
  assert right["AP50"] == right["class_accuracy"] == right["count_accuracy"] == 1.0
  wrong = coco_eval.score_scenes(truth(1), images, targets, generator.CANVAS)
  assert wrong["class_accuracy"] == 0.0 and wrong["count_accuracy"] == 1.0
  assert wrong["AP50"] == 0.0


def test_command_errors_are_one_line_exit_2(tmp_path):
  proc = conftest.run_command("experiments.outside_scenes", f"--workdir={tmp_path}/none")
  assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-1000:]
  proc = conftest.run_command("experiments.outside_scenes", f"--workdir={tmp_path}", "--num=0")
  assert proc.returncode == 2 and "--num=0 must be positive" in proc.stderr, proc.stderr[-1000:]
