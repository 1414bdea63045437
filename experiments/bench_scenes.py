"""Benchmark parts beyond the seed's task (`experiments.benchmark` runs each in a
subprocess): the scene cases' detectors, the MNIST detection layout's networks, reading a
dataset from disk, replicas (several members in one program), and the evaluation's cost."""

import os
import time

from absl import flags

from experiments import bench_seed


def train_multi_dense(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the dense detector."""
  return bench_seed.train_jaxloc(steps, config=multi_config("dense"))


def train_multi_slots(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the slot detector."""
  return bench_seed.train_jaxloc(steps, config=multi_config("slots"))


def train_md_single(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("single", "none"))


def train_md_fpn(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("fpn", "none"))


def train_md_fpn_group(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("fpn", "group"))


def train_md_fpn_batch(steps):
  return bench_seed.train_jaxloc(steps, config=_md_config("fpn", "batch"))


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

  from jaxloc import configs, datasets, loaders

  path = flags.FLAGS.data
  if not path:
    path = os.path.join(tempfile.mkdtemp(), "set")
    spec = configs.read(_md_config("fpn", "none"))
    datasets.write(path, loaders.export_scenes(spec, 1000, "test", 0))
  t = time.perf_counter()
  data = datasets.read(path)
  dt = time.perf_counter() - t
  n = len(data.images)
  return {"images": n, "size": data.canvas_size, "read_s": dt, "images_per_s": n / dt}


def multi_config(head):
  from experiments.configs import multi

  config = multi.get_config()
  config.head = head
  config.dense.norm = "none"  # the network of docs/speed.md's rows
  return config


def replicas(steps):
  """The seed model: one run, then --replicas members by vmap and by lax.map; images/s of
  all members and their ratio to one run (>= 1: faster than runs one after the other)."""
  return _replicas(steps, None)


def replicas_multi(steps):
  """`replicas` on a scene case: `multi` (128x128) with the dense detector."""
  return _replicas(steps, multi_config("dense"))


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


def evaluate_two(steps):
  """Seconds to score two models (a run's averaged and raw weights) on the seed's validation
  set (10,000 canvases): one evaluation after the other, and both in one compiled call per
  batch (`members`, what a run does); the best of `steps // 100` (at least 2) alternations."""
  return _evaluate_two(steps, None)


def evaluate_two_multi(steps):
  """`evaluate_two` on 2,000 validation scenes of `multi` with the dense detector."""
  config = multi_config("dense")
  config.num_val = 2000
  return _evaluate_two(steps, config)


def _evaluate_two(steps, config):

  import jax

  from experiments.configs import digit
  from jaxloc import configs, loaders, parallel, tasks, train_state

  config = config or digit.get_config()
  config.mnist_dir = flags.FLAGS.mnist_dir or ""
  spec = configs.read(config)
  task = tasks.build(spec)
  mesh = parallel.data_mesh()
  val = parallel.replicate(loaders.load(spec)[2], mesh)
  models = [
    train_state.raw_variables(train_state.create_train_state(jax.random.key(i), spec))
    for i in (0, 1)
  ]
  apply_fn = task.model.apply
  one, both = task.make_evaluator(apply_fn, mesh), task.make_evaluator(apply_fn, mesh, True)
  stacked = parallel.stack(models)
  ways = {
    "apart_s": lambda: [one(p, val) for p in models],
    "one_call_s": lambda: both(stacked, val),
  }
  best = _best_seconds(ways, max(2, steps // 100))
  result = dict(best, one_call_vs_apart=best["apart_s"] / best["one_call_s"])
  num_val = len(val["labels"]) if spec.data.num_val <= 0 else spec.data.num_val
  result.update(backend=jax.default_backend(), num_val=num_val)
  return result


def evaluate_batch(steps):
  """Seconds to score one model on the seed's validation set (10,000 canvases) per
  `eval_batch_size`; the best of `steps // 100` (at least 2) alternating rounds."""

  import jax

  from experiments.configs import digit
  from jaxloc import configs, loaders, parallel, spec, tasks, train_state

  config = digit.get_config()
  config.mnist_dir = flags.FLAGS.mnist_dir or ""
  seed_spec = configs.read(config)
  mesh = parallel.data_mesh()
  val = parallel.replicate(loaders.load(seed_spec)[2], mesh)
  params = train_state.raw_variables(train_state.create_train_state(jax.random.key(0), seed_spec))
  ways = {}
  for size in (500, 250, 100, 50):
    task = tasks.build(spec.replace(seed_spec, data={"eval_batch_size": size}))
    evaluate = task.make_evaluator(task.model.apply, mesh)
    ways[f"batch_{size}_s"] = lambda evaluate=evaluate: evaluate(params, val)
  return dict(_best_seconds(ways, max(2, steps // 100)), backend=jax.default_backend())


def _best_seconds(ways: dict, rounds: int) -> dict[str, float]:
  """{name: the least seconds of `fn()`}: every fn once first (compiling), then `rounds`
  rounds alternating between them, so a slow spell of the machine falls on all alike."""
  for fn in ways.values():
    fn()
  best = {k: float("inf") for k in ways}
  for _ in range(rounds):
    for k, fn in ways.items():
      t = time.perf_counter()
      fn()
      best[k] = min(best[k], time.perf_counter() - t)
  return best
