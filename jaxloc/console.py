"""What a run prints, and the switch that keeps library INFO logs off the console.

A training run prints what it is about to do (backend and devices, parameters,
steps), a progress bar (only on a terminal), one line per epoch with the figures a
researcher watches, and where its outputs went. Orbax, jax and TensorFlow log at
INFO through absl / Python logging; `quiet_library_logs` sets them to WARNING
unless asked for (`--verbose` on every experiment script).
"""

import os

import jax
from absl import logging
from tqdm import tqdm

# Validation figures on an epoch line, when the task reports them: (key, label).
VAL_FIGURES = (
  ("accuracy", "acc"),
  ("count_accuracy", "count"),
  ("presence_accuracy", "presence"),
  ("class_accuracy", "class"),
  ("mean_iou", "IoU"),
  ("AP", "AP"),
  ("AP50", "AP50"),
)


def quiet_library_logs(verbose: bool = False) -> None:
  """Library logs at WARNING (or, `verbose`, INFO): absl, Python logging, TF's C++ logs."""
  logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
  # Read by TensorFlow's C++ side when TFDS imports it (only to prepare MNIST).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")


def echo(line: str) -> None:
  """Prints a line without breaking a progress bar on the terminal."""
  tqdm.write(line)


def progress_bar(total: int, initial: int):
  """A tqdm bar over training steps, shown only when stderr is a terminal."""
  return tqdm(total=total, initial=initial, desc="train", disable=not os.isatty(2), leave=False)


def devices_line() -> str:
  """The backend and devices JAX uses, e.g. `backend cpu: 1 device (TFRT_CPU_0), 1 process`."""
  devices = jax.devices()
  kinds = sorted({d.device_kind for d in devices})
  n = len(devices)
  return (
    f"backend {jax.default_backend()}: {n} device{'s' * (n != 1)} ({', '.join(kinds)}), "
    f"{jax.process_count()} process{'es' * (jax.process_count() != 1)}"
  )


def start_lines(spec, n_params: int, resume_step: int | None, replica_mode=None) -> list[str]:
  """What the run is about to do: devices, parameters, new or resumed, its steps."""
  sched, reps = spec.schedule, spec.replicas
  where = f"resuming at step {resume_step}" if resume_step is not None else "new run"
  if replica_mode:
    last = spec.seed + reps.count - 1
    where += f"; {reps.count} replicas (seeds {spec.seed}..{last}, {replica_mode})"
    if reps.varied:
      where += f", varying {spec.fields['vary']}"
  return [
    devices_line(),
    f"model: {n_params:,} parameters; {where}",
    f"training: {sched.epochs} epochs x {sched.steps_per_epoch} steps of batch "
    f"{spec.data.batch_size} = {sched.total_steps:,} steps, {sched.steps_per_call} per "
    "compiled call",
  ]


def epoch_line(record: dict, epochs: int, images_per_s: float, seconds: float) -> str:
  """`epoch 3/10 | train loss 0.31 class_loss 0.29 ... | val acc 0.95 IoU 0.81 | ... img/s`."""
  losses = sorted((k != "train/loss", k) for k in record if k.startswith("train/") and "loss" in k)
  train = " ".join(f"{k[6:]} {record[k]:.4f}" for _, k in losses)
  val = " ".join(
    f"{label} {record['val/' + key]:.3f}" for key, label in VAL_FIGURES if "val/" + key in record
  )
  return (
    f"epoch {record['epoch']}/{epochs} | train {train} | val {val} | "
    f"{images_per_s:,.0f} img/s, {seconds:.1f} s"
  )


def end_lines(out_dir: str, final: dict, drawn: bool) -> list[str]:
  """The end of a run; `drawn`: whether it drew predictions.png (`config.num_plot` > 0)."""
  return [
    f"done: {final['steps']:,} steps in {final['wall_s']:.1f} s: {final['train_s']:.1f} s "
    f"training ({final['train_images_per_s']:,.0f} images/s), {final['compile_s']:.1f} s "
    f"compiling the train step, {final['eval_s']:.1f} s evaluating, {final['save_s']:.1f} s "
    "writing checkpoints",
    f"outputs in {out_dir}: metrics.json (final figures), metrics.jsonl, params.msgpack, "
    f"{'predictions.png, ' if drawn else ''}curves.png, tensorboard/ (tensorboard --logdir "
    f"{os.path.dirname(os.path.normpath(out_dir)) or os.curdir})",
  ]


def summary_lines(out_dir: str, summary: dict, finals: list[dict]) -> list[str]:
  """The end of a replica run: the watched figures over the members (and of each member,
  when they differ by listed values: `finals`, their metrics.json), time, outputs."""
  f = summary["figures"]
  figures = ", ".join(
    "{} {mean:.3f} +- {std:.3f} [{min:.3f}, {max:.3f}]".format(label, **f[key])
    for key, label in VAL_FIGURES
    if key in f
  )
  varied = summary.get("varied") or {}
  each = [
    f"member {i} ({', '.join(f'{k} {v[i]:g}' for k, v in varied.items())}): "
    + ", ".join(f"{label} {final[key]:.3f}" for key, label in VAL_FIGURES if key in final)
    for i, final in enumerate(finals if varied else [])
  ]
  return [
    *each,
    f"{summary['members']} members: {figures} (mean +- std [min, max])",
    f"done: {f['steps']['mean']:,.0f} steps each in {f['wall_s']['mean']:.1f} s: "
    f"{f['train_s']['mean']:.1f} s training ({summary['images_per_s']:,.0f} images/s, all "
    f"members), {f['compile_s']['mean']:.1f} s compiling, {f['eval_s']['mean']:.1f} s evaluating, "
    f"{f['save_s']['mean'] * summary['members']:.1f} s writing checkpoints",
    f"outputs in {out_dir}: summary.json, member-0 .. member-{summary['members'] - 1}/ "
    "(each a workdir: evaluate, predict, Predictor, resume)",
  ]
