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


def test_command_errors_are_one_line_exit_2(tmp_path):
  proc = conftest.run_command("experiments.outside_scenes", f"--workdir={tmp_path}/none")
  assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr[-1000:]
  proc = conftest.run_command("experiments.outside_scenes", f"--workdir={tmp_path}", "--num=0")
  assert proc.returncode == 2 and "--num=0 must be positive" in proc.stderr, proc.stderr[-1000:]
