"""The run's spec: a config read once (`jaxloc.configs.read`), as frozen typed groups, one
per consumer: `data`, `schedule`, `opt`, `head`, `scene`, `replicas`. Everything below the
entry points takes a `Spec`, a group of it, or plain values, never the ConfigDict.

The task kind is the head's type: `DigitHead` (the seed's `Localizer`, one digit per
canvas; `scene` is None), `SlotHead` (K slots) or `DenseHead` (the dense detector).
`Spec.fields` is the upgraded config as a dict: what config.json holds and what a resume
is compared against; `replace` and `member` keep it in step with the typed values.
"""

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class Data:
  """Where the digits come from and how many canvases each pass takes."""

  mnist_dir: str  # "" = $JAXLOC_MNIST_DIR, else TFDS
  canvas_size: int
  batch_size: int
  eval_batch_size: int
  num_val: int  # validation canvases: digits <= 0 = all test digits; scenes resolved
  val_seed: int
  num_plot: int
  train_path: str = ""  # scene datasets on disk ("" = synthetic)
  val_path: str = ""
  image_root: str = ""  # a COCO file's image folder ("" = beside it, then images/)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How long the run trains and how often it logs and saves."""

  epochs: int
  steps_per_epoch: int
  total_steps: int  # epochs * steps_per_epoch
  steps_per_call: int  # resolved for the backend
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Adam's step size and its schedule, and the moving average of the weights."""

  learning_rate: float  # the peak of a schedule
  lr_schedule: str  # "constant" | "cosine"
  warmup_steps: int
  total_steps: int  # where the cosine reaches 0
  ema_decay: float  # 0 = no moving average


@dataclasses.dataclass(frozen=True)
class Scene:
  """The scene synthesis of `scenes.sample_scene` (a scene case; None for the seed's task)."""

  max_objects: int
  count_probs: tuple[float, ...]
  target_class: int
  distractor_prob: float
  size_range: tuple[int, int]
  box_type: str
  paste_mode: str
  max_overlap: float
  classify: bool

  def sample_args(self, batch_size: int, canvas_size: int) -> dict:
    """Keyword arguments of `scenes.sample_scene`."""
    args = dataclasses.asdict(self)
    del args["classify"]
    return dict(args, batch_size=batch_size, canvas_size=canvas_size)


@dataclasses.dataclass(frozen=True)
class DigitHead:
  """The seed's `Localizer`: class + box of one digit."""

  conv_features: tuple[int, ...]
  dense_features: int
  class_loss_weight: float
  box_loss_weight: float
  # loss argument -> config field: the weights a replica member may vary
  VARIED = {"class_weight": "class_loss_weight", "box_weight": "box_loss_weight"}


@dataclasses.dataclass(frozen=True)
class SlotHead:
  """K slot heads (`model.Detector`). Its class and box weights also set the evaluation's
  matching, which members share, so they are not varied."""

  conv_features: tuple[int, ...]
  dense_features: int
  class_loss_weight: float
  box_loss_weight: float
  count_loss_weight: float
  objectness_loss_weight: float
  VARIED = {
    "count_weight": "scene.count_loss_weight",
    "objectness_weight": "scene.objectness_loss_weight",
  }


@dataclasses.dataclass(frozen=True)
class DenseHead:
  """The dense detector (`model.DenseDetector`, `jaxloc.dense`)."""

  conv_features: tuple[int, ...]
  backbone: str
  pyramid_features: tuple[int, ...]
  neck_features: int
  norm: str
  stride: int
  context_features: tuple[int, ...]
  top_k: int
  score_threshold: float
  heatmap_loss_weight: float
  box_loss_weight: float
  giou_loss_weight: float  # fixed for a run's members (0: the term is not computed)
  prior: float
  VARIED = {"heatmap_weight": "dense.heatmap_loss_weight", "box_weight": "dense.box_loss_weight"}


Head = DigitHead | SlotHead | DenseHead


@dataclasses.dataclass(frozen=True)
class Replicas:
  """N members in one program: seeds seed..seed+N-1, `varied` values one per member."""

  count: int
  mode: str  # resolved: "vmap" | "map"
  varied: tuple[tuple[str, tuple[float, ...]], ...] = ()  # ((config field, values), ...)


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything a run reads of its config."""

  seed: int
  data: Data
  schedule: Schedule
  opt: Optimizer
  head: Head
  scene: Scene | None
  replicas: Replicas
  fields: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)  # config.json

  def hyperparameters(self) -> dict[str, float]:
    """{config field: value} of the numbers that enter the compiled train step as
    arguments, not constants, so replica members may differ in them: the Adam step size
    (a schedule's peak), the moving average's decay and the head's loss weights."""
    values = {"learning_rate": self.opt.learning_rate, "ema_decay": self.opt.ema_decay}
    for field in self.head.VARIED.values():
      values[field] = getattr(self.head, field.rpartition(".")[2])
    return {k: float(v) for k, v in values.items()}


def member(spec: Spec, i: int) -> Spec:
  """Member `i` of a replica run, a run of its own: seed `spec.seed + i`, its listed values."""
  changes = {"opt": {}, "head": {}}
  for field, values in spec.replicas.varied:
    group = "opt" if field in ("learning_rate", "ema_decay") else "head"
    changes[group][field.rpartition(".")[2]] = values[i]
  out = replace(spec, **changes)
  fields = dict(out.fields, seed=spec.seed + i, replicas=1, vary="")
  replicas = Replicas(count=1, mode=spec.replicas.mode)
  return dataclasses.replace(out, seed=spec.seed + i, replicas=replicas, fields=fields)


def members(spec: Spec) -> list[Spec]:
  """The member specs of a replica run (the spec itself when it has one member)."""
  if spec.replicas.count == 1:
    return [spec]
  return [member(spec, i) for i in range(spec.replicas.count)]


def replace(spec: Spec, **groups) -> Spec:
  """`spec` with some fields of its groups changed, e.g. `replace(spec, data={"num_val": 8})`;
  `fields` follows, so the result writes and resumes as the run it describes."""
  fields = copy.deepcopy(dict(spec.fields))
  out = {}
  for group, changes in groups.items():
    out[group] = dataclasses.replace(getattr(spec, group), **changes)
    for name, value in changes.items():
      *parents, last = _config_path(spec, group, name).split(".")
      functools.reduce(lambda d, g: d.setdefault(g, {}), parents, fields)[last] = value
  return dataclasses.replace(spec, **out, fields=fields)


def _config_path(spec: Spec, group: str, name: str) -> str:
  """The config field behind `spec.<group>.<name>`."""
  if group == "scene" or (group == "data" and name in ("train_path", "val_path", "image_root")):
    return f"{group}.{name}"
  if (
    group == "head"
    and isinstance(spec.head, SlotHead)
    and name in ("count_loss_weight", "objectness_loss_weight")
  ):
    return f"scene.{name}"
  if group == "head" and isinstance(spec.head, DenseHead) and name != "conv_features":
    return f"dense.{name}"
  return name
