"""MNIST digits as uint8 [N, 28, 28] and int32 labels [N], from IDX files or TFDS.

`load(split, mnist_dir=...)` (or the env variable `JAXLOC_MNIST_DIR`) reads the
standard IDX files, gzip or raw; without a directory it uses TFDS, which
downloads and prepares MNIST on first use. TensorFlow Datasets is imported
lazily, only on that path, so `import jaxloc` never imports TensorFlow. Before TFDS
downloads, a few seconds' probe of MNIST's download server turns an offline machine
into one clear error (TFDS itself would retry for minutes).
"""

import gzip
import os
import struct
import threading
import urllib.error
import urllib.request

import numpy as np

from jaxloc.errors import UserError

ENV_VAR = "JAXLOC_MNIST_DIR"
SPLITS = ("train", "test")
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801  # ubyte data, 3 dims / 1 dim
DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"  # where TFDS gets MNIST
PROBE_TIMEOUT_S = 5.0


def load(split: str, *, mnist_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images uint8 [N,28,28], labels int32 [N])` of MNIST `split` ("train"/"test")."""
  if split not in SPLITS:
    raise UserError(f"unknown MNIST split {split!r}; use one of {SPLITS}")
  mnist_dir = mnist_dir or os.environ.get(ENV_VAR) or None
  if mnist_dir:
    return load_idx(split, mnist_dir)
  return load_tfds(split)


def _find(mnist_dir: str, name: str) -> str:
  for candidate in (name, name + ".gz"):
    path = os.path.join(mnist_dir, candidate)
    if os.path.isfile(path):
      return path
  raise UserError(
    f"MNIST file {name}[.gz] not found in {mnist_dir!r}; put the standard IDX files there "
    f"or unset {ENV_VAR} / --config.mnist_dir to download MNIST with TFDS"
  )


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise UserError(f"{path}: cannot read ({e}); the file is corrupt or truncated") from None


def read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
  """Reads one uint8 IDX array, checking magic number, header and payload size."""
  data = _read_bytes(path)
  header = 4 + 4 * ndim
  if len(data) < header:
    raise UserError(f"{path}: only {len(data)} bytes, shorter than an IDX header; file truncated")
  (found,) = struct.unpack(">I", data[:4])
  if found != magic:
    raise UserError(
      f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
      f"({'images' if magic == _IMAGE_MAGIC else 'labels'}); wrong or corrupt file"
    )
  shape = struct.unpack(f">{ndim}I", data[4:header])
  expected = int(np.prod(shape))
  if len(data) - header != expected:
    raise UserError(
      f"{path}: header promises shape {shape} ({expected} bytes) but holds "
      f"{len(data) - header} bytes; file truncated or corrupt"
    )
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def load_idx(split: str, mnist_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` from `mnist_dir`."""
  if not os.path.isdir(mnist_dir):
    raise UserError(f"MNIST directory {mnist_dir!r} does not exist")
  prefix = _PREFIX[split]
  image_path = _find(mnist_dir, f"{prefix}-images-idx3-ubyte")
  label_path = _find(mnist_dir, f"{prefix}-labels-idx1-ubyte")
  images = read_idx(image_path, _IMAGE_MAGIC, 3)
  labels = read_idx(label_path, _LABEL_MAGIC, 1)
  if images.shape[1:] != (28, 28):
    raise UserError(f"{image_path}: images are {images.shape[1:]}, MNIST digits must be 28x28")
  if len(images) != len(labels):
    raise UserError(
      f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
    )
  if len(images) == 0:
    raise UserError(f"{image_path}: no images")
  if labels.max() > 9:
    raise UserError(f"{label_path}: label {int(labels.max())} out of range 0..9")
  return images.copy(), labels.astype(np.int32)


def load_tfds(split: str, *, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """MNIST through `tfds.data_source` (random access; prepared as array_record)."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise UserError(
      "no MNIST directory given and tensorflow-datasets is not installed: "
      f"`pip install 'jaxloc[tfds]'`, or set {ENV_VAR}=/path/to/idx/files"
    ) from None
  try:
    prepared = tfds.builder("mnist", data_dir=data_dir, file_format="array_record").is_prepared()
  except Exception as e:  # a broken TFDS directory or install: the same advice applies
    raise UserError(_offline_message(e)) from None
  if not prepared:
    check_reachable(DOWNLOAD_URL, PROBE_TIMEOUT_S)
  try:
    source = tfds.data_source(
      "mnist",
      split=split,
      data_dir=data_dir,
      builder_kwargs={"file_format": "array_record"},
    )
    examples = [source[i] for i in range(len(source))]
  except Exception as e:  # TFDS raises many types when offline; all mean the same here.
    raise UserError(_offline_message(e)) from None
  images = np.stack([np.asarray(ex["image"], np.uint8).reshape(28, 28) for ex in examples])
  labels = np.asarray([ex["label"] for ex in examples], np.int32)
  return images, labels


def check_reachable(url: str, timeout_s: float) -> None:
  """A `UserError` unless the server at `url` answers within `timeout_s` seconds.

  The probe runs in a thread so that a name lookup that hangs (no timeout of its own)
  is bounded too. Any HTTP answer, even an error status, means the network works.
  """
  outcome = []

  def probe():
    try:
      urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s)
      outcome.append(None)
    except urllib.error.HTTPError:
      outcome.append(None)
    except Exception as e:  # noqa: BLE001 (URLError, OSError, ssl errors: all unreachable)
      outcome.append(e)

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  error = outcome[0] if outcome else TimeoutError(f"no answer from {url} in {timeout_s:.0f} s")
  if error is not None:
    raise UserError(_offline_message(error))


def _offline_message(e: Exception) -> str:
  first_line = (str(e).splitlines() or [""])[0][:200]
  return (
    f"could not load MNIST with TFDS ({type(e).__name__}: {first_line}). "
    f"Offline? Point jaxloc at local IDX files: set {ENV_VAR}=/path/to/mnist or pass "
    "--config.mnist_dir=/path/to/mnist"
  )
