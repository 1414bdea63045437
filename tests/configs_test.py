"""configs.read: every config file reads; every setting that cannot work is one UserError
that names the field and the fix (in-process: the train script's CLI test shows that a
UserError becomes one line and exit 2); old config.json files keep their meaning; the spec's
derived values and member specs."""

import importlib
import json
import os
import pathlib

import jax
import pytest
from conftest import ROOT, small_config, train_run

from experiments.configs import digit, multi
from jaxloc import configs, spec, workdir
from jaxloc.errors import UserError
from jaxloc.inference import Predictor

DATA = pathlib.Path(__file__).parent / "data"


def _config(name: str, fields: dict):
  """experiments/configs/NAME.py with `fields` ("dense.stride": 6) set."""
  config = importlib.import_module(f"experiments.configs.{name}").get_config()
  for path, value in fields.items():
    *groups, last = path.split(".")
    node = config
    for g in groups:
      node = node[g]
    node[last] = value
  return config


def test_every_config_file_reads():
  folder = pathlib.Path(ROOT) / "experiments" / "configs"
  names = [p.stem for p in folder.glob("*.py") if p.stem[0] != "_" and p.stem != "scene_base"]
  assert "mnist_detection" in names and "smoke" in names
  heads = {name: type(configs.read(_config(name, {})).head) for name in names}
  assert heads["digit"] is spec.DigitHead and heads["mnist_detection"] is spec.DenseHead


@pytest.mark.parametrize(
  "name,fields,match",
  [
    ("digit", {"batch_size": 0}, "config.batch_size=0 must be a positive integer"),
    ("digit", {"epochs": -1}, "config.epochs=-1 must be a positive integer"),
    ("digit", {"steps_per_epoch": 0}, "config.steps_per_epoch=0 must be a positive integer"),
    ("digit", {"steps_per_call": 0}, "config.steps_per_call=0 must be -1 \\(per backend\\)"),
    ("digit", {"canvas_size": 20}, "canvas_size=20 is smaller than a 28x28 digit"),
    ("digit", {"learning_rate": 0.0}, "config.learning_rate=0.0 must be positive"),
    ("digit", {"ema_decay": 1.0}, r"config.ema_decay=1.0 must lie in \[0, 1\)"),
    ("digit", {"lr_schedule": "linear"}, "lr_schedule='linear': use 'constant' or 'cosine'"),
    ("digit", {"warmup_steps": -5}, "config.warmup_steps=-5 must be an integer >= 0"),
    ("digit", {"num_plot": -1}, r"config.num_plot=-1 must be an integer >= 0 \(0: draw none\)"),
    ("digit", {"replicas": 0}, "config.replicas=0 must be a positive integer"),
    ("digit", {"replica_mode": "pmap"}, "replica_mode='pmap': use 'auto', 'vmap' or 'map'"),
    ("multi", {"dense.stride": 6}, "config.dense.stride=6: the output stride is 2 \\*\\* "),
    ("multi", {"dense.stride": 16}, "with 3 conv stages use one of \\[2, 4, 8\\]"),
    ("multi", {"dense.top_k": 1}, "config.dense.top_k=1 must be an integer from max_objects \\(2"),
    ("multi", {"dense.top_k": 2561}, "number of heatmap cells x classes \\(2560\\)"),
    ("multi", {"dense.score_threshold": 0.0}, "score_threshold=0.0 must lie strictly between"),
    ("multi", {"dense.score_threshold": 1.5}, "score_threshold=1.5 must lie strictly between"),
    ("multi", {"dense.prior": 1.0}, "config.dense.prior=1.0 must lie strictly between 0 and 1"),
    ("multi", {"dense.giou_loss_weight": -1.0}, "giou_loss_weight=-1.0 must be 0 \\(off\\)"),
    ("multi", {"head": "grid"}, "config.head='grid': use one of 'dense', 'slots'"),
    ("multi", {"dense.backbone": "resnet"}, "config.dense.backbone='resnet': use one of"),
    (
      "multi",
      {"dense.norm": "layer"},
      "config.dense.norm='layer': use one of \\('none', 'group', 'batch'",
    ),
    ("multi", {"dense.neck_features": 0}, "config.dense.neck_features=0 must be a positive"),
    ("multi", {"scene.paste_mode": "mean"}, "config.scene.paste_mode='mean': use one of"),
    ("multi", {"scene.box_type": "pixels"}, "use one of \\('patch', 'tight', 'ink'\\)"),
    ("multi", {"scene.count_probs": (0.5, 0.5)}, "must be 3 probabilities"),
    ("multi", {"scene.size_range": (30, 20)}, "must satisfy 1 <= min <= max"),
    ("multi", {"scene.max_objects": 0}, "config.scene.max_objects=0 must be a positive integer"),
    (
      "multi",
      {"canvas_size": 64, "scene.max_objects": 5, "scene.count_probs": (0.5, 0.5, 0, 0, 0, 0)},
      "5 digits of up to 28px cannot be placed without overlap on a 64px canvas",
    ),
    ("single", {"scene.target_class": 12}, "use -1 \\(any\\) or 0..9"),
    ("presence", {"scene.distractor_prob": 0.5}, "needs a config.scene.target_class"),
  ],
)
def test_a_setting_that_cannot_work_is_one_error(name, fields, match):
  with pytest.raises(UserError, match=match):
    configs.read(_config(name, fields))


@pytest.mark.parametrize(
  "fields,match",
  [
    (
      {"replicas": 2, "vary": "learning_rate=1e-3,2e-3,3e-3"},
      "config.vary lists 3 values of learning_rate for config.replicas=2: one value per "
      "member (--config.replicas=3)",
    ),
    (
      {"replicas": 2, "vary": "momentum=0.9,0.99"},
      "config.vary='momentum=0.9,0.99': 'momentum=0.9,0.99' is not <field>=<value>,<value>,... "
      "of a field this config's members may vary (learning_rate, ema_decay, class_loss_weight, "
      'box_loss_weight); e.g. --config.vary="learning_rate=1e-3,3e-3 ema_decay=0.99,0.999"',
    ),
    (
      {"replicas": 2, "vary": "learning_rate=1e-3,fast"},
      "config.vary='learning_rate=1e-3,fast': the values of learning_rate must be numbers",
    ),
    (
      {"replicas": 2, "vary": "ema_decay=0.1,0.2 ema_decay=0.3,0.4"},
      "config.vary='ema_decay=0.1,0.2 ema_decay=0.3,0.4' lists ema_decay twice",
    ),
    (
      {"replicas": 2, "vary": "learning_rate=1e-3,-1"},
      "config.vary: member 1: config.learning_rate=-1.0 must be positive",
    ),
    (
      {"replicas": 2, "vary": "ema_decay=0,0.99"},
      "config.vary: ema_decay mixes 0 (no moving average) with averages; the members share one "
      "train state layout, so list only values > 0, or only 0",
    ),
  ],
)
def test_bad_replica_settings_are_one_error(fields, match):
  with pytest.raises(UserError) as error:
    configs.read(small_config("", **fields))
  assert str(error.value) == match


def test_a_bad_config_writes_nothing(tmp_path):
  with pytest.raises(UserError, match="batch_size=0"):
    train_run(small_config("", batch_size=0), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_derived_values_are_computed_once():
  seed = configs.read(digit.get_config())
  assert seed.scene is None and seed.schedule.total_steps == 10 * 937 == seed.opt.total_steps
  assert seed.data.num_val == -1  # the seed's task: all test digits
  assert configs.read(multi.get_config()).data.num_val == 10_000
  scene = configs.read(_config("multi", {"num_val": 0}))
  assert scene.data.num_val == configs.SCENE_VAL_DEFAULT
  read = lambda n: configs.read(small_config("", steps_per_call=n)).schedule.steps_per_call
  assert read(7) == 7
  assert read(-1) == (10 if jax.default_backend() == "cpu" else 1)  # a loop of 10 on the CPU
  assert configs.read(small_config("")).replicas.mode == "vmap"


def test_members_are_specs_with_their_own_seed_and_values():
  config = _config(
    "multi", {"replicas": 2, "vary": "learning_rate=3e-3,1e-3 dense.box_loss_weight=1,2"}
  )
  run = configs.read(config)
  assert set(run.hyperparameters()) == {
    "learning_rate",
    "ema_decay",
    "dense.heatmap_loss_weight",
    "dense.box_loss_weight",
  }
  first, second = spec.members(run)
  assert (second.seed, second.opt.learning_rate, second.head.box_loss_weight) == (1, 1e-3, 2.0)
  assert (first.seed, first.opt.learning_rate, first.head.box_loss_weight) == (0, 3e-3, 1.0)
  assert second.fields["dense"]["box_loss_weight"] == 2.0 and second.fields["vary"] == ""
  assert run.fields["dense"]["box_loss_weight"] == 1.0  # the run's own fields untouched
  assert configs.read(second.fields) == second  # a member's config.json reads as its spec


def test_replace_keeps_the_fields_in_step():
  run = configs.read(multi.get_config())
  changed = spec.replace(run, head={"score_threshold": 0.3}, data={"val_path": "x"})
  assert changed.head.score_threshold == 0.3 and changed.data.val_path == "x"
  assert changed.fields["dense"]["score_threshold"] == 0.3
  assert changed.fields["data"]["val_path"] == "x"
  assert run.head.score_threshold == 0.15 and run.fields["dense"]["score_threshold"] == 0.15
  with pytest.raises(TypeError):
    spec.replace(run, head={"no_such_field": 1})


def test_configs_saved_before_new_fields_keep_their_meaning():
  old = multi.get_config().to_dict()
  for name in ("head", "lr_schedule", "warmup_steps"):
    del old[name]
  upgraded = configs.upgrade(old)
  assert (upgraded["head"], upgraded["lr_schedule"], upgraded["warmup_steps"]) == (
    "slots",
    "constant",
    0,
  )
  assert "head" not in configs.upgrade(digit.get_config().to_dict())
  assert isinstance(configs.read(old).head, spec.SlotHead)


def test_a_workdir_with_an_old_config_json_resumes_and_predicts(mnist_dir, tmp_path):
  """tests/data/old_smoke_config.json: the smoke config as runs wrote it before the moving
  average, schedules and replicas existed. Such a run resumes with today's equivalent
  config (no moving average, constant step size) and its Predictor reads it."""
  old = json.loads((DATA / "old_smoke_config.json").read_text())
  assert "ema_decay" not in old and "replicas" not in old
  run = tmp_path / "run"
  today = small_config(mnist_dir, ema_decay=0.0)
  train_run(small_config(mnist_dir, ema_decay=0.0, epochs=1), run)
  workdir.write_json(str(run / workdir.CONFIG), dict(old, mnist_dir=mnist_dir, epochs=1))
  final = train_run(today, run)
  assert final["resumed_from_step"] == 3 and final["steps"] == 6
  assert os.path.exists(run / workdir.PARAMS)
  predictor = Predictor.from_workdir(str(run))
  assert predictor.spec.opt.ema_decay == 0.0
