"""Speed and memory of jaxloc against the seed's Keras/tf.data pipeline, on identical digits.

    python -m experiments.benchmark --steps=200 --out=runs/benchmark.json

Each measurement runs in its own subprocess (so peak resident memory is its
own) on the same MNIST training digits, batch 64, canvas 75:

  canvas_jaxloc   canvases/s of jaxloc.canvas.training_batch, the training sampler (jitted,
                  on the device), one batch of 64 per call
  canvas_tfdata   canvases/s of the seed's tf.data pipeline: map(pad_to_bounding_box at
                  random offsets) -> shuffle(5000) -> batch(64) -> prefetch
  train_jaxloc    training images/s, steady state (compile time reported apart), with the
                  backend's default steps per call; train_jaxloc_1: one step per call
  train_keras     training images/s of the seed's Keras model under model.fit on that pipeline
  matmul          float32 GFLOP/s of a 2048x2048 matmul: the machine's FLOP bound
  train_multi_dense, train_multi_slots
                  training images/s of case 4 (`multi`, 128x128 scenes) with the dense
                  detector and with the slot detector
  train_md_single, train_md_fpn, train_md_fpn_group
                  training images/s on the MNIST detection benchmark's layout (300x300,
                  0-19 digits of 15-99 px, batch 16) with the single-scale network, the
                  feature pyramid, and the pyramid with GroupNorm
  profile         ms per batch: forward and gradient, jaxloc's conv vs XLA's native conv
  read_dataset    seconds to read a detection dataset from disk (`jaxloc.datasets.read`):
                  --data=PATH, or 1,000 scenes of the benchmark layout exported first

Rows that need TensorFlow are skipped (and the table says so) without the [tfds] extra.
Prints a markdown table; --out writes all figures as JSON.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import flags

from experiments import cli
from jaxloc.errors import UserError

_PART = flags.DEFINE_string("part", None, "Internal: run one measurement and print JSON.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed batches / training steps per measurement.")
_OUT = flags.DEFINE_string("out", None, "Write the figures as JSON here.")
_MNIST_DIR = flags.DEFINE_string("mnist_dir", None, "IDX directory (default: $JAXLOC_MNIST_DIR).")
_STEPS_PER_CALL = flags.DEFINE_integer("steps_per_call", -1, "jaxloc steps per call (-1: auto).")
_PARTS = flags.DEFINE_list("parts", None, "Run only these measurements (default: all).")
_DATA = flags.DEFINE_string("data", None, "read_dataset: the dataset folder to read.")

BATCH, CANVAS = 64, 75
PARTS = (
  "canvas_jaxloc",
  "canvas_tfdata",
  "train_jaxloc",
  "train_jaxloc_1",
  "train_keras",
  "matmul",
  "profile",
  "train_multi_dense",
  "train_multi_slots",
  "train_md_single",
  "train_md_fpn",
  "train_md_fpn_group",
  "read_dataset",
)


def train_flops_per_image(canvas_size: int = CANVAS) -> float:
  """Multiply-adds x 2 of the seed model's forward pass, x 3 for forward + backward."""
  flops, size, channels = 0, canvas_size, 1
  for features in (16, 32, 64):
    size -= 2  # 3x3 VALID conv
    flops += 2 * size * size * 9 * channels * features
    channels, size = features, size // 2
  flat = size * size * channels
  flops += 2 * (flat * 128 + 128 * 10 + 128 * 4)
  return 3.0 * flops


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _digits():
  from jaxloc import mnist

  return mnist.load("train", mnist_dir=_MNIST_DIR.value or None)


def _time_loop(fn, steps: int) -> float:
  t = time.perf_counter()
  fn(steps)
  return time.perf_counter() - t


def canvas_jaxloc(steps):
  import jax

  from jaxloc import canvas

  digits, labels = (jax.numpy.asarray(a) for a in _digits())
  key = jax.random.key(0)
  step_numbers = [jax.numpy.int32(i) for i in range(steps + 1)]  # as the train state holds it
  sample = lambda i: canvas.training_batch(
    key, step_numbers[i], digits, labels, batch_size=BATCH, canvas_size=CANVAS
  )
  jax.block_until_ready(sample(steps))

  def loop(n):  # like iterating tf.data with prefetch: the next batch is queued while the
    # current one is finished; finished batches are dropped, as a training loop drops them
    prev = sample(0)
    for i in range(1, n):
      cur = sample(i)
      jax.block_until_ready(prev)
      prev = cur
    jax.block_until_ready(prev)

  result = {"canvases_per_s": steps * BATCH / _time_loop(loop, steps)}

  # Where the time of one call goes, microseconds: the call itself (a jitted function
  # returning a batch of zeros: dispatch + output buffers), the stream order alone, the
  # paste alone; and canvases/s when 10 batches are made per call, as a training scan does.
  jnp = jax.numpy
  n = labels.shape[0]
  zeros = jax.jit(
    lambda s: {
      "image": jnp.zeros((BATCH, CANVAS, CANVAS, 1)) + s,
      "label": jnp.zeros(BATCH, jnp.int32) + s,
      "box": jnp.zeros((BATCH, 4)) + s,
    }
  )
  order = jax.jit(lambda s: canvas.stream_index(key, s, BATCH, n))
  xy = canvas.sample_offsets(key, BATCH, CANVAS)
  paste = jax.jit(lambda xy: canvas.render(digits[:BATCH], labels[:BATCH], xy, canvas_size=CANVAS))
  ten = jax.jit(
    lambda s: jax.lax.map(
      lambda t: canvas.training_batch(key, t, digits, labels, batch_size=BATCH, canvas_size=CANVAS),
      s * 10 + jnp.arange(10),
    )
  )
  reps = max(3, steps)
  for name, fn, arg in (
    ("call_us", zeros, jnp.int32(1)),
    ("order_us", order, jnp.int32(1)),
    ("paste_us", paste, xy),
    ("whole_us", lambda s: sample(1), None),
  ):
    result[name] = _seconds_per_call(fn, arg, reps) * 1e6
  result["canvases_per_s_10_per_call"] = 10 * BATCH / _seconds_per_call(ten, jnp.int32(1), reps)
  return result


def seed_pipeline(digits, labels):
  """The seed's tf.data pipeline: random offsets, pad to 75x75, shuffle, batch, prefetch."""
  import tensorflow as tf

  def place(image, label):
    xmin = tf.random.uniform((), 0, CANVAS - 28 + 1, dtype=tf.int32)
    ymin = tf.random.uniform((), 0, CANVAS - 28 + 1, dtype=tf.int32)
    image = tf.cast(tf.reshape(image, (28, 28, 1)), tf.float32) / 255.0
    image = tf.image.pad_to_bounding_box(image, ymin, xmin, CANVAS, CANVAS)
    box = tf.cast(tf.stack([xmin, ymin, xmin + 28, ymin + 28]), tf.float32) / CANVAS
    return image, (tf.one_hot(label, 10), box)

  ds = tf.data.Dataset.from_tensor_slices((digits, labels.astype("int64"))).repeat()
  ds = ds.map(place, num_parallel_calls=tf.data.AUTOTUNE).shuffle(5000)
  return ds.batch(BATCH, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def canvas_tfdata(steps):
  ds = iter(seed_pipeline(*_digits()))
  next(ds)

  def loop(n):
    for _ in range(n):
      next(ds)

  return {"canvases_per_s": steps * BATCH / _time_loop(loop, steps)}


def train_jaxloc_1(steps):
  """train_jaxloc with one step per compiled call: the other side of the steps_per_call choice."""
  return train_jaxloc(steps, steps_per_call=1)


def train_multi_dense(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the dense detector."""
  return train_jaxloc(steps, config=_multi_config("dense"))


def train_multi_slots(steps):
  """Training images/s of case 4 (`multi`, 128x128) with the slot detector."""
  return train_jaxloc(steps, config=_multi_config("slots"))


def train_md_single(steps):
  return train_jaxloc(steps, config=_md_config("single", "none"))


def train_md_fpn(steps):
  return train_jaxloc(steps, config=_md_config("fpn", "none"))


def train_md_fpn_group(steps):
  return train_jaxloc(steps, config=_md_config("fpn", "group"))


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

  path = _DATA.value
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


def train_jaxloc(steps, steps_per_call=None, config=None):
  import jax

  from experiments.configs import digit
  from jaxloc import tasks, train_state

  config = config or digit.get_config()
  digits, labels = (jax.numpy.asarray(a) for a in _digits())
  init_key, data_key = jax.random.split(jax.random.key(0))
  task = tasks.build(config)
  sample_fn, loss_fn = task.sample_fn, task.loss_fn
  state = train_state.create_train_state(init_key, config)
  sums = train_state.zero_metrics(state, digits, labels, sample_fn=sample_fn, loss_fn=loss_fn)
  n = steps_per_call or tasks.resolve_steps_per_call(_STEPS_PER_CALL.value)
  t = time.perf_counter()
  fn = train_state.compile_train_steps(
    state, sums, digits, labels, data_key, num_steps=n, sample_fn=sample_fn, loss_fn=loss_fn
  )
  compile_s = time.perf_counter() - t
  state, sums = fn(state, sums, digits, labels, data_key)  # warm-up
  jax.block_until_ready(sums)
  calls = max(1, steps // n)
  t = time.perf_counter()
  for _ in range(calls):
    state, sums = fn(state, sums, digits, labels, data_key)
  jax.block_until_ready(sums)
  dt = time.perf_counter() - t
  return {
    "images_per_s": calls * n * config.batch_size / dt,
    "compile_s": compile_s,
    "steps_per_call": n,
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
  }


def keras_model():
  """The seed's model, layer for layer (426,638 parameters)."""
  import keras
  from keras import layers

  inputs = keras.Input((CANVAS, CANVAS, 1))
  x = inputs
  for features in (16, 32, 64):
    x = layers.AveragePooling2D(2)(layers.Conv2D(features, 3, activation="relu")(x))
  x = layers.Dense(128, activation="relu")(layers.Flatten()(x))
  outputs = [
    layers.Dense(10, activation="softmax", name="classification")(x),
    layers.Dense(4, name="bounding_box")(x),
  ]
  model = keras.Model(inputs, outputs)
  model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=["categorical_crossentropy", "mse"])
  return model


def train_keras(steps):
  import keras

  model = keras_model()
  assert model.count_params() == 426_638
  ds = seed_pipeline(*_digits())
  times = []

  class Timer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
      self.t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
      times.append(time.perf_counter() - self.t)

  model.fit(ds, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[Timer()])
  return {"images_per_s": steps * BATCH / times[1], "first_epoch_s": times[0]}


def _seconds_per_call(fn, arg, reps: int) -> float:
  """Steady-state seconds per call of a jitted `fn(arg)` (one warm-up call first)."""
  import jax

  jax.block_until_ready(fn(arg))
  t = time.perf_counter()
  for _ in range(reps):
    out = fn(arg)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def matmul(steps):
  import jax
  import jax.numpy as jnp

  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  reps = max(3, steps // 20)
  return {"gflops": 2 * n**3 / _seconds_per_call(jax.jit(lambda a: a @ a), a, reps) / 1e9}


def profile(steps):
  """Milliseconds per batch of 64 for the parts of a step, and for flax.linen.Conv instead
  of jaxloc's patch-matmul Conv3x3 (same parameters): where the time goes."""
  import flax.linen as nn
  import jax

  from jaxloc import model

  class LaxConvLocalizer(nn.Module):  # the seed model with XLA's native convolution
    @nn.compact
    def __call__(self, x):
      for f in (16, 32, 64):
        x = model.avg_pool_2x2(nn.relu(nn.Conv(f, (3, 3), padding="VALID")(x)))
      x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
      return {"logits": nn.Dense(10)(x), "box": nn.Dense(4)(x)}

  x = jax.random.uniform(jax.random.key(0), (BATCH, CANVAS, CANVAS, 1))
  result = {}
  for name, net in (("jaxloc", model.Localizer()), ("lax_conv", LaxConvLocalizer())):
    params = model.init_params(jax.random.key(1), net, CANVAS)
    loss = lambda p, net=net: sum(v.sum() for v in net.apply({"params": p}, x).values())
    for part, fn in (("forward", jax.jit(loss)), ("gradient", jax.jit(jax.grad(loss)))):
      seconds = _seconds_per_call(fn, params, max(3, steps // 10))
      result[f"{name}_{part}_ms"] = seconds * 1000
  return result


def _run_part(name: str, steps: int) -> dict:
  result = globals()[name](steps)
  result["peak_rss_mb"] = _peak_rss_mb()
  return result


def _subprocess(name: str) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "experiments.benchmark",
    f"--part={name}",
    f"--steps={_STEPS.value}",
    f"--steps_per_call={_STEPS_PER_CALL.value}",
  ]
  if _DATA.value:
    cmd.append(f"--data={_DATA.value}")
  if _MNIST_DIR.value:
    cmd.append(f"--mnist_dir={_MNIST_DIR.value}")
  proc = subprocess.run(cmd, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"skipped": tail[:200]}
  return json.loads(lines[-1])


def _table(r: dict) -> str:
  def fig(part, key, fmt="{:,.0f}"):
    v = r[part].get(key)
    return fmt.format(v) if v is not None else f"skipped: {r[part].get('skipped', '')}"

  def ratio(a, b, key):
    x, y = r[a].get(key), r[b].get(key)
    return f"{x / y:.2f}x" if x and y else "n/a"

  bound = r["matmul"].get("gflops", 0) * 1e9 / train_flops_per_image()
  share = r["train_jaxloc"].get("images_per_s", 0) / bound if bound else 0
  rows = [
    "| measurement | jaxloc | seed (Keras / tf.data) | jaxloc / seed |",
    "| --- | --- | --- | --- |",
    f"| canvases/s, batch 64 | {fig('canvas_jaxloc', 'canvases_per_s')} | "
    f"{fig('canvas_tfdata', 'canvases_per_s')} | "
    f"{ratio('canvas_jaxloc', 'canvas_tfdata', 'canvases_per_s')} |",
    f"| training images/s, batch 64 | {fig('train_jaxloc', 'images_per_s')} | "
    f"{fig('train_keras', 'images_per_s')} | "
    f"{ratio('train_jaxloc', 'train_keras', 'images_per_s')} |",
    f"| peak RSS of training, MB | {fig('train_jaxloc', 'peak_rss_mb')} | "
    f"{fig('train_keras', 'peak_rss_mb')} | "
    f"{ratio('train_jaxloc', 'train_keras', 'peak_rss_mb')} |",
    f"| peak RSS of canvas synthesis, MB | {fig('canvas_jaxloc', 'peak_rss_mb')} | "
    f"{fig('canvas_tfdata', 'peak_rss_mb')} | "
    f"{ratio('canvas_jaxloc', 'canvas_tfdata', 'peak_rss_mb')} |",
    f"| jaxloc training images/s, 1 step per call (no scan) | "
    f"{fig('train_jaxloc_1', 'images_per_s')} | | |",
    f"| jaxloc compile time of the train step, s | {fig('train_jaxloc', 'compile_s', '{:.1f}')}"
    " | | |",
    f"| `multi` (128x128) training images/s: dense detector / slot detector | "
    f"{fig('train_multi_dense', 'images_per_s')} / {fig('train_multi_slots', 'images_per_s')} "
    "| | step time dense / slots: "
    f"{ratio('train_multi_slots', 'train_multi_dense', 'images_per_s')} |",
    "| MNIST detection layout (300x300, batch 16) training images/s: single-scale / fpn / "
    f"fpn + GroupNorm | {fig('train_md_single', 'images_per_s', '{:,.1f}')} / "
    f"{fig('train_md_fpn', 'images_per_s', '{:,.1f}')} / "
    f"{fig('train_md_fpn_group', 'images_per_s', '{:,.1f}')} | | step time fpn / single: "
    f"{ratio('train_md_single', 'train_md_fpn', 'images_per_s')}, fpn + GroupNorm / single: "
    f"{ratio('train_md_single', 'train_md_fpn_group', 'images_per_s')} |",
    f"| reading a detection dataset ({r['read_dataset'].get('images', '?')} PNGs of "
    f"{r['read_dataset'].get('size', '?')}px), s | {fig('read_dataset', 'read_s', '{:.1f}')} "
    f"({fig('read_dataset', 'images_per_s')} images/s) | | |",
    "",
    f"float32 bound: {r['matmul'].get('gflops', 0):.0f} GFLOP/s (2048^2 matmul) / "
    f"{train_flops_per_image() / 1e6:.1f} MFLOP per training image = {bound:,.0f} images/s; "
    f"jaxloc reaches {share:.0%} of it "
    f"({r['train_jaxloc'].get('backend', '?')}, steps_per_call="
    f"{r['train_jaxloc'].get('steps_per_call', '?')}).",
    "",
    "Profile, ms per batch of 64 (forward / forward+backward): "
    + ", ".join(
      f"{name} {r['profile'].get(f'{name}_forward_ms', 0):.1f} / "
      f"{r['profile'].get(f'{name}_gradient_ms', 0):.1f}"
      for name in ("jaxloc", "lax_conv")
    )
    + " (lax_conv: the same model with flax.linen.Conv).",
    "",
    "Canvas synthesis, microseconds per call of 64 canvases: the whole batch "
    f"{r['canvas_jaxloc'].get('whole_us', 0):.0f}; each part alone in its own call: an "
    f"empty call returning zeros of the batch's shapes {r['canvas_jaxloc'].get('call_us', 0):.0f}"
    f", the stream order {r['canvas_jaxloc'].get('order_us', 0):.0f}, the paste "
    f"{r['canvas_jaxloc'].get('paste_us', 0):.0f}; "
    f"10 batches per call: {r['canvas_jaxloc'].get('canvases_per_s_10_per_call', 0):,.0f} "
    "canvases/s.",
  ]
  return "\n".join(rows)


def main(argv):
  del argv
  if _PART.value:
    print(json.dumps(_run_part(_PART.value, _STEPS.value)))
    return
  results = {name: {"skipped": "not run (--parts)"} for name in PARTS}
  for name in _PARTS.value or PARTS:
    if name not in PARTS:
      raise UserError(f"unknown part {name!r}; choose from {', '.join(PARTS)}")
    results[name] = _subprocess(name)
    print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
  results["machine"] = {
    "cpus": os.cpu_count(),
    "python": sys.version.split()[0],
    "steps": _STEPS.value,
  }
  if _PARTS.value:  # a subset: its figures only (the table needs every part)
    for name in _PARTS.value:
      print(f"{name}: {json.dumps(results[name])}")
  else:
    print(_table(results))
  if _OUT.value:
    from jaxloc import workdir

    workdir.write_json(_OUT.value, results)


if __name__ == "__main__":
  cli.run(main)
