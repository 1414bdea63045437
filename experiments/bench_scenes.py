"""Benchmark parts beyond the seed's task (`experiments.benchmark` runs each in a
subprocess): the scene cases' detectors, the MNIST detection layout's networks, reading a
dataset from disk, and replicas (several members in one program)."""

import os
import time

from absl import flags

from experiments import bench_seed


def train_multi_dense(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the dense detector."""
  return bench_seed.train_jaxloc(steps, config=_multi_config("dense"))


def train_multi_slots(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the slot detector."""
  return bench_seed.train_jaxloc(steps, config=_multi_config("slots"))


def train_md_single(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("single", "none"))


def train_md_fpn(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("fpn", "none"))


def train_md_fpn_group(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("fpn", "group"))


def _md_config(backbone, norm):
  """The benchmark layout at the README's CPU budget (batch 16) with one network."""
  from experiments.configs import mnist_detection

  config = mnist_detection.get_config()
  config.batch_size = 16
  config.dense.backbone, config.dense.norm = backbone, norm
  return config


def read_dataset(steps):
  """Seconds to read a dataset folder (PNG decoding on threads) and images/s."""
  del steps
  import tempfile

  from jaxloc import datasets, tasks

  path = flags.FLAGS.data
  if not path:
    path = os.path.join(tempfile.mkdtemp(), "set")
    datasets.write(path, tasks.export_scenes(_md_config("fpn", "none"), 1000, "test", 0))
  t = time.perf_counter()
  data = datasets.read(path)
  dt = time.perf_counter() - t
  n = len(data.images)
  return {"images": n, "size": data.canvas_size, "read_s": dt, "images_per_s": n / dt}


def _multi_config(head):
  from experiments.configs import multi

  config = multi.get_config()
  config.head = head
  return config


def replicas(steps):
  """The seed model: one run, then --replicas members by vmap and by lax.map; images/s of
  all members and their ratio to one run (>= 1: faster than runs one after the other)."""
  return _replicas(steps, None)


def replicas_multi(steps):
  """`replicas` on a scene case: `multi` (128x128) with the dense detector."""
  return _replicas(steps, _multi_config("dense"))


def _replicas(steps, config):
  one = bench_seed.train_jaxloc(steps, config=config)
  result = {"one_images_per_s": one["images_per_s"], "one_memory_mb": one["memory_mb"]}
  n = flags.FLAGS.replicas
  for mode in ("vmap", "map"):
    r = bench_seed.train_jaxloc(max(1, steps // n), config=config, members=n, mode=mode)
    result[f"{mode}_images_per_s"] = r["images_per_s"]
    result[f"{mode}_vs_one"] = r["images_per_s"] / one["images_per_s"]
    result[f"{mode}_memory_mb"] = r["memory_mb"]
    result[f"{mode}_compile_s"] = r["compile_s"]
  result.update(members=n, backend=one["backend"], device=one["device"])
  return result
