"""A spec's data as numpy arrays: `load(spec)` gives the training digits (or a training set
on disk) and the fixed validation set; `load_set` reads a dataset on disk
(`jaxloc.datasets`) for a spec's detector; `export_scenes` writes a scene spec's synthetic
scenes as a `datasets.Dataset`. `parallel.replicate` puts what they return on the devices.
"""

import jax
import numpy as np

from jaxloc import canvas, datasets, evaluation, mnist
from jaxloc.errors import UserError
from jaxloc.spec import SlotHead, Spec


def load(spec: Spec):
  """(digits, labels, val): MNIST training digits and the validation set, or for a scene
  spec with `data.train_path` (`val_path`) a stored set (`load_set`) in place of the
  training digits and None for labels (of the validation scenes' test digits)."""
  data = spec.data
  mnist_dir = data.mnist_dir or None
  if spec.scene is None:
    train_digits, train_labels = mnist.load("train", mnist_dir=mnist_dir)
    test_digits, test_labels = mnist.load("test", mnist_dir=mnist_dir)
    if data.num_val > 0:
      test_digits, test_labels = test_digits[: data.num_val], test_labels[: data.num_val]
    val_key = jax.random.key(data.val_seed)
    val = {
      "digits": test_digits,
      "labels": test_labels,
      "xy": canvas.validation_offsets(val_key, len(test_labels), data.canvas_size),
    }
    return train_digits, train_labels, val
  paths = (("train", data.train_path), ("test", data.val_path))
  digits = {split: mnist.load(split, mnist_dir=mnist_dir) for split, path in paths if not path}
  train = (load_set(data.train_path, spec), None) if data.train_path else digits["train"]
  if data.val_path:
    val = load_set(data.val_path, spec, limit=data.num_val)
  else:  # validation scenes are drawn from the test digits with a fixed key
    val = {"digits": digits["test"][0], "labels": digits["test"][1]}
  return (*train, val)


def load_set(path: str, spec: Spec, limit: int = -1) -> dict:
  """A dataset on disk (`jaxloc.datasets.read`) as a dict of numpy arrays for
  `scenes.stored_scene`: its first `limit` scenes (all if limit <= 0), with as many slots as
  the spec's detector needs. Canvases of another size than the spec's are refused."""
  data = datasets.read(path, image_root=spec.data.image_root)
  canvas_size = spec.data.canvas_size
  if data.canvas_size != canvas_size:
    raise UserError(
      f"{path} holds {data.canvas_size}x{data.canvas_size} images but config.canvas_size="
      f"{canvas_size}; use --config.canvas_size={data.canvas_size}"
    )
  k, slots = data.valid.shape[1], spec.scene.max_objects
  if isinstance(spec.head, SlotHead) and k > slots:
    raise UserError(
      f"{path} has up to {k} digits an image; the slot detector has "
      f"config.scene.max_objects={slots} slots (raise it, or use --config.head=dense)"
    )
  n = len(data.images) if limit <= 0 else min(limit, len(data.images))
  pad = lambda a: np.pad(a[:n], [(0, 0), (0, max(0, slots - k))] + [(0, 0)] * (a.ndim - 2))
  return {
    "images": data.images[:n],
    "box": pad(data.box),
    "label": pad(data.label),
    "valid": pad(data.valid),
  }


def export_scenes(spec: Spec, num: int, split: str, seed: int) -> datasets.Dataset:
  """`num` scenes of a scene spec from the `split` digits as a `datasets.Dataset` (uint8
  images), made as the validation chunks are (`evaluation.sampled_chunk` with `seed` as
  val_seed): with the test split, seed = val_seed and num = num_val, a run's validation set."""
  digits, labels = mnist.load(split, mnist_dir=spec.data.mnist_dir or None)
  chunk = min(evaluation.SCENE_VAL_CHUNK, num)
  sample_args = spec.scene.sample_args(chunk, spec.data.canvas_size)
  parts = []
  for i in range(-(-num // chunk)):
    val = {"digits": digits, "labels": labels}
    scene = jax.device_get(evaluation.sampled_chunk(val, i, val_seed=seed, **sample_args))
    scene["image"] = np.round(scene["image"][..., 0] * 255).astype(np.uint8)  # 1/4 the memory
    parts.append(scene)
  cat = lambda name: np.concatenate([p[name] for p in parts])[:num]
  return datasets.Dataset(
    images=cat("image"), box=cat("box"), label=cat("label"), valid=cat("valid")
  )
