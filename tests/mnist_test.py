import gzip
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import write_idx, write_mnist

from jaxloc import mnist
from jaxloc.errors import UserError


def _write_split(d, images, labels, gz=True, prefix="train"):
  write_mnist(str(d), {prefix: (images, labels)}, gz=gz)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_gzip_and_raw(tmp_path, gz):
  images = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28) % 256
  labels = np.array([3, 0, 9])
  _write_split(tmp_path, images, labels, gz=gz, prefix="t10k")
  x, y = mnist.load("test", mnist_dir=str(tmp_path))
  assert x.dtype == np.uint8 and x.shape == (3, 28, 28)
  assert y.dtype == np.int32 and y.tolist() == [3, 0, 9]
  np.testing.assert_array_equal(x, images.astype(np.uint8))


def test_env_variable_selects_directory(tmp_path, monkeypatch):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 2]))
  monkeypatch.setenv(mnist.ENV_VAR, str(tmp_path))
  assert mnist.load("train")[1].tolist() == [1, 2]


def test_real_mnist_when_available(mnist_dir):
  x, y = mnist.load("test", mnist_dir=mnist_dir)
  assert x.shape[1:] == (28, 28) and len(x) == len(y) and set(np.unique(y)) <= set(range(10))


def _expect(tmp_path, match):
  with pytest.raises(UserError, match=match):
    mnist.load("train", mnist_dir=str(tmp_path))


def test_missing_file(tmp_path):
  _expect(tmp_path, "train-images-idx3-ubyte.*not found")


def test_missing_directory(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    mnist.load("train", mnist_dir=str(tmp_path / "nope"))


def test_unknown_split(tmp_path):
  with pytest.raises(UserError, match="unknown MNIST split"):
    mnist.load("validation", mnist_dir=str(tmp_path))


def test_bad_magic(tmp_path):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 2]))
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)), magic=0x0801)
  _expect(tmp_path, "magic number 0x00000801, expected 0x00000803")


def test_truncated_payload(tmp_path):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 2]))
  path = tmp_path / "train-images-idx3-ubyte.gz"
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:-100]))
  _expect(tmp_path, "truncated")


def test_truncated_header(tmp_path):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 2]))
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00"))
  _expect(tmp_path, "shorter than an IDX header")


def test_corrupt_gzip(tmp_path):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 2]))
  path = tmp_path / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:30])
  _expect(tmp_path, "corrupt or truncated")


def test_wrong_image_size(tmp_path):
  _write_split(tmp_path, np.zeros((2, 32, 32)), np.array([1, 2]))
  _expect(tmp_path, "must be 28x28")


def test_count_mismatch(tmp_path):
  _write_split(tmp_path, np.zeros((3, 28, 28)), np.array([1, 2]))
  _expect(tmp_path, "3 images but .* 2 labels")


def test_label_out_of_range(tmp_path):
  _write_split(tmp_path, np.zeros((2, 28, 28)), np.array([1, 12]))
  _expect(tmp_path, "label 12 out of range")


def test_empty_file(tmp_path):
  _write_split(tmp_path, np.zeros((0, 28, 28)), np.zeros((0,)))
  _expect(tmp_path, "no images")


def test_tfds_path_with_mock_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.delenv(mnist.ENV_VAR, raising=False)
  monkeypatch.setattr(mnist, "check_reachable", lambda url, timeout_s: None)  # mocks need no net
  with tfds.testing.mock_data(num_examples=12):
    x, y = mnist.load("train")
  assert x.shape == (12, 28, 28) and x.dtype == np.uint8
  assert y.shape == (12,) and y.dtype == np.int32 and y.max() <= 9


def test_tfds_failure_is_one_clear_error(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

  monkeypatch.setattr(tfds, "data_source", offline)
  monkeypatch.delenv(mnist.ENV_VAR, raising=False)
  with pytest.raises(UserError, match="Offline\\? Point jaxloc at local IDX files"):
    mnist.load("test")


def test_offline_fails_within_seconds(monkeypatch, tmp_path):
  """No MNIST on disk and a network that never answers (a firewalled node): the clear
  error comes after the probe's timeout, not after minutes of TFDS download retries."""
  pytest.importorskip("tensorflow_datasets")
  calls = []

  def hangs(request, timeout):
    calls.append(request.full_url)
    time.sleep(60)

  monkeypatch.setattr(urllib.request, "urlopen", hangs)
  monkeypatch.setattr(mnist, "PROBE_TIMEOUT_S", 1.0)  # the probe's own bound, shortened
  start = time.perf_counter()
  with pytest.raises(UserError, match=r"TimeoutError: no answer from .* in 1 s\). Offline"):
    mnist.load_tfds("train", data_dir=str(tmp_path))
  assert time.perf_counter() - start < 6
  assert calls == [mnist.DOWNLOAD_URL]


def test_unreachable_server_is_one_clear_error(monkeypatch, tmp_path):
  pytest.importorskip("tensorflow_datasets")

  def refused(request, timeout):
    raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

  monkeypatch.setattr(urllib.request, "urlopen", refused)
  with pytest.raises(UserError, match="URLError: .*Connection refused.*--config.mnist_dir"):
    mnist.load_tfds("test", data_dir=str(tmp_path))


def test_tfds_missing_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  monkeypatch.delenv(mnist.ENV_VAR, raising=False)
  with pytest.raises(UserError, match=r"pip install 'jaxloc\[tfds\]'"):
    mnist.load("test")


def test_import_jaxloc_does_not_import_tensorflow():
  import subprocess

  code = (
    "import sys, jaxloc, jaxloc.train, jaxloc.mnist, jaxloc.canvas, jaxloc.model;"
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)
