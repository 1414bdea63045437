"""Benchmark parts of the seed's task (`experiments.benchmark` runs each in a subprocess):
jaxloc's canvas synthesis and training step against the seed's tf.data pipeline and Keras
model on the same digits, the machine's matmul bound, and a profile of the step."""

import os
import time

from absl import flags

BATCH, CANVAS = 64, 75


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


def _digits():
  from jaxloc import mnist

  return mnist.load("train", mnist_dir=flags.FLAGS.mnist_dir or None)


def _time_loop(fn, steps: int) -> float:
  t = time.perf_counter()
  fn(steps)
  return time.perf_counter() - t


def _seconds_per_call(fn, arg, reps: int) -> float:
  """Steady-state seconds per call of a jitted `fn(arg)` (one warm-up call first)."""
  import jax

  jax.block_until_ready(fn(arg))
  t = time.perf_counter()
  for _ in range(reps):
    out = fn(arg)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / reps


def canvas_jaxloc(steps):
  import jax

  from jaxloc import canvas, stream

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
  order = jax.jit(lambda s: stream.stream_index(key, s, BATCH, n))
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


def compiled_steps(config=None, steps_per_call=None, members=1, mode=None):
  """The compiled training program of `config` (default: the seed's; with `mode`, `members`
  replicas in one program) and its arguments: (fn, (state, sums, *data), steps per call,
  compile seconds). `fn(*args)` returns the next (state, sums)."""
  import jax

  from experiments.configs import digit
  from jaxloc import configs, parallel, tasks, train_state

  spec = configs.read(config or digit.get_config())
  digits, labels = (jax.numpy.asarray(a) for a in _digits())
  task = tasks.build(spec)
  static = dict(sample_fn=task.sample_fn, loss_fn=task.loss_fn)
  keys = [jax.random.split(jax.random.key(i)) for i in range(members)]
  states = [train_state.create_train_state(k[0], spec, task.model) for k in keys]
  zeros = [train_state.zero_metrics(s, digits, labels, **static) for s in states]
  hp = train_state.step_hyperparameters(spec)
  state, sums, data_key = states[0], zeros[0], keys[0][1]
  if mode:
    state, sums = parallel.stack(states), parallel.stack(zeros)
    data_key, hp = parallel.stack([k[1] for k in keys]), parallel.stack([hp] * members)
  data = (digits, labels, data_key, hp)
  static["optimizer_fn"] = train_state.optimizer_fn(spec.opt)
  n = steps_per_call or flags.FLAGS.steps_per_call
  n = n if n > 0 else spec.schedule.steps_per_call
  mesh = None
  if jax.device_count() > 1 and not mode:  # as a run does: the batch split over the devices
    mesh = parallel.data_mesh()
    state, sums, data = parallel.replicate((state, sums, data), mesh)
  t = time.perf_counter()
  fn = train_state.compile_train_steps(
    state, sums, *data, num_steps=n, replicas=mode, mesh=mesh, **static
  )
  return fn, (state, sums, *data), n, time.perf_counter() - t


def train_jaxloc(steps, steps_per_call=None, config=None, members=1, mode=None):
  """Training images/s (all members together) of `config` (default: the seed's), steady
  state; with `mode` ("vmap" / "map"), `members` replicas in one program."""
  import jax

  from experiments.configs import digit

  config = config or digit.get_config()
  fn, (state, sums, *data), n, compile_s = compiled_steps(config, steps_per_call, members, mode)
  memory = fn.compiled.memory_analysis()
  state, sums = fn(state, sums, *data)  # warm-up
  jax.block_until_ready(sums)
  calls = max(1, steps // n)
  t = time.perf_counter()
  for _ in range(calls):
    state, sums = fn(state, sums, *data)
  jax.block_until_ready(sums)
  dt = time.perf_counter() - t
  return {
    "images_per_s": calls * n * config.batch_size * members / dt,
    "compile_s": compile_s,
    "steps_per_call": n,
    "members": members,
    "memory_mb": (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
    if memory is not None
    else None,
    "backend": jax.default_backend(),
    "device": str(jax.devices()[0].device_kind),
  }


def train_jaxloc_1(steps):
  """train_jaxloc with one step per compiled call: the other side of the steps_per_call choice."""
  return train_jaxloc(steps, steps_per_call=1)


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
  """Training images/s of the seed's Keras model under model.fit, with TensorFlow's default
  for this CPU: on Linux its oneDNN kernels only where the CPU has AVX512_VNNI, AVX512_BF16,
  AVX_VNNI or AMX (AVX-512 machines such as AMD Zen 4), its Eigen kernels elsewhere
  (`onednn` in the figures says which ran)."""
  import keras
  from tensorflow.python.util import _pywrap_util_port

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
  return {
    "images_per_s": steps * BATCH / times[1],
    "first_epoch_s": times[0],
    "onednn": bool(_pywrap_util_port.IsMklEnabled()),
  }


def train_keras_onednn(steps):
  """`train_keras` with TensorFlow's oneDNN kernels on (TF_ENABLE_ONEDNN_OPTS=1), as
  TensorFlow runs by default on AVX-512 machines: on an AVX2 CPU, the path an AVX-512
  machine takes, with this CPU's instructions. Needs a process that has not yet imported
  TensorFlow (each benchmark part runs in its own)."""
  import sys

  if "tensorflow" in sys.modules:
    raise RuntimeError("train_keras_onednn must run before TensorFlow is imported")
  os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1"
  return train_keras(steps)


def keras_protocol(steps):
  """The seed's Keras model trained on the seed's protocol (10 epochs of `steps` batches of 64
  through the seed's tf.data pipeline; the protocol is --steps=937, 60000 // 64) and scored on
  jaxloc's validation canvases of the seed's task (one per MNIST test digit, the offsets of
  experiments/configs/digit.py): accuracy, mean IoU and IoU >= 0.6, as jaxloc reports them."""
  import keras
  import numpy as np

  from experiments.configs import digit
  from jaxloc import boxes, canvas, configs, loaders, metrics

  config = digit.get_config()
  config.mnist_dir = flags.FLAGS.mnist_dir or ""
  spec = configs.read(config)
  digits, labels, val = loaders.load(spec)
  canvases = canvas.render(val["digits"], val["labels"], val["xy"], canvas_size=CANVAS)
  model = keras_model()
  t = time.perf_counter()
  model.fit(seed_pipeline(digits, labels), epochs=10, steps_per_epoch=steps, verbose=0)
  train_s = time.perf_counter() - t
  probs, box = model.predict(np.asarray(canvases["image"]), batch_size=500, verbose=0)
  iou = np.asarray(boxes.iou(box.astype(np.float32), np.asarray(canvases["box"])))
  return {
    "accuracy": float(np.mean(probs.argmax(-1) == np.asarray(canvases["label"]))),
    "mean_iou": float(iou.mean()),
    "iou_at_0_6": float(np.mean(iou >= metrics.IOU_THRESHOLD)),
    "num_val": len(iou),
    "steps": 10 * steps,
    "train_s": train_s,
    "keras": keras.__version__,
  }


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
