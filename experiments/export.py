"""Writes jaxloc scenes to disk for another detector, in both formats at once.

    python -m experiments.export --config=experiments/configs/mnist_detection.py \\
      --out=data/mnist_detection/train --num=10000 --split=train
    python -m experiments.export --config=experiments/configs/mnist_detection.py \\
      --out=data/mnist_detection/test --num=1000 --split=test

`--out` gets images/<i>.png, labels/<i>.txt (the MNIST-detection generator's folder) and
annotations.json (COCO) over the same PNGs (`jaxloc.datasets`). Scenes are drawn from the
training or test digits as a run's validation scenes are: chunk i of 500 with key
fold_in(key(seed), i); `--seed` defaults to the config's `val_seed`, so the test split with
`--num=config.num_val` is exactly a run's validation set. The same seed gives the same
files. Pixels are rounded to uint8; boxes to whole pixels, outwards (the `patch` and `ink`
box types are whole pixels already).
"""

from absl import flags
from ml_collections import config_flags

from experiments import cli
from jaxloc import configs, datasets, loaders
from jaxloc.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "A scene config file.")
_OUT = flags.DEFINE_string("out", None, "A new (or empty) folder to write.")
_NUM = flags.DEFINE_integer("num", 1000, "Scenes to write.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "test"], "MNIST digits to draw from.")
_SEED = flags.DEFINE_integer("seed", None, "Scene seed (default: the config's val_seed).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
  spec = configs.read(_CONFIG.value)
  if spec.scene is None:
    raise UserError(
      "--config must be a scene config (with config.scene); the seed's digit task has no scenes"
    )
  if _NUM.value < 1:
    raise UserError(f"--num={_NUM.value} must be positive")
  seed = spec.data.val_seed if _SEED.value is None else _SEED.value
  data = loaders.export_scenes(spec, _NUM.value, _SPLIT.value, seed)
  datasets.write(_OUT.value, data)
  print(
    f"wrote {_NUM.value} scenes ({int(data.valid.sum())} digits, {_SPLIT.value} digits, seed "
    f"{seed}) to {_OUT.value}: images/, labels/, {datasets.COCO_FILE}"
  )


if __name__ == "__main__":
  cli.run(main)
