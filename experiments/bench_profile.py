"""Benchmark part `step_profile` (and `_multi`): where a training step's time goes on this
machine, from a `jax.profiler` trace of the compiled step (`experiments.benchmark` runs it
in a subprocess)."""

import collections
import glob
import gzip
import json
import re
import tempfile
import time

import jax

from experiments import bench_scenes, bench_seed


def step_profile(steps, config=None):
  """Where the seed model's training step (or `config`'s) spends its time on this CPU: ms
  per step in each of XLA's compiled operations (its fusions and library calls, by the name
  in the compiled program), from a `jax.profiler` trace of `steps` steps, the 15 largest,
  each with its output shape and the model operation it was made from (the HLO's op_name).
  Operations XLA:CPU runs asynchronously (its own dot and convolution calls) count their
  launch only, so `listed_ms` can fall short of `step_ms`."""
  fn, (state, sums, *data), n, _ = bench_seed.compiled_steps(config)
  state, sums = fn(state, sums, *data)  # warm-up
  jax.block_until_ready(sums)
  calls = max(1, steps // n)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(calls):
      state, sums = fn(state, sums, *data)
    jax.block_until_ready(sums)
    step_ms = (time.perf_counter() - t) * 1000 / (calls * n)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  us = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
      us[e["args"]["hlo_op"]] += e["dur"]
  hlo = fn.compiled.as_text()
  ops = []
  for name, total in us.most_common(15):
    m = re.search(rf"%{re.escape(name)} = (\S+) .*?op_name=\"([^\"]*)\"", hlo)
    shape, source = (m.group(1), m.group(2).split("closed_call/")[-1]) if m else ("?", "?")
    ops.append([round(total / 1000 / (calls * n), 2), name, shape, source])
  listed = sum(total for total in us.values()) / 1000 / (calls * n)
  return {"step_ms": step_ms, "listed_ms": listed, "ops": ops}


def step_profile_multi(steps):
  """`step_profile` of case 4's dense detector (`multi`, 128x128 scenes, batch 64)."""
  return step_profile(steps, bench_scenes.multi_config("dense"))
