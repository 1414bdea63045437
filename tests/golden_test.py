"""Golden figures: a small run of the seed's task and of the dense detector, on the fixed
fake digits of `conftest.fake_mnist`, give these final figures and parameter checksums. A
change that moves numbers (a refactor that should not) fails here. After a change that is
meant to move them, run `pytest tests/golden_test.py -s` and paste what it prints.

Measured under the suite's settings (conftest: XLA's quickest compilation). Tolerances allow for
float32 rounding across CPU kinds (AVX2 / AVX-512 kernels), not for a
change of arithmetic."""

import numpy as np
import pytest
from conftest import case_config, fake_mnist, small_config, train_run
from flax import serialization

from jaxloc import workdir

GOLDEN = {
  "seed": {
    "accuracy": 0.175,
    "mean_iou": 0.0022592868655920027,
    "class_loss": 2.26534423828125,
    "box_loss": 0.1311280608177185,
    "params_l1": 9876.430211092236,
    "params_weighted": -9.243711129953196,
  },
  "dense": {
    "count_accuracy": 0.375,
    "heatmap_loss": 4.517658233642578,
    "box_loss": 3.4035861492156982,
    "params_l1": 7223.6236213235115,
    "params_weighted": -34.274054907617334,
  },
}


def _checksums(run) -> dict[str, float]:
  """The exported weights' L1 norm, and their sum weighted by sin(position): it changes when
  values move between parameters, too."""
  params = serialization.msgpack_restore((run / workdir.PARAMS).read_bytes())
  flat = np.concatenate([np.ravel(np.asarray(p, np.float64)) for p in _leaves(params)])
  return {
    "params_l1": float(np.abs(flat).sum()),
    "params_weighted": float((flat * np.sin(np.arange(flat.size))).sum()),
  }


def _leaves(tree):
  if isinstance(tree, dict):
    for key in sorted(tree):
      yield from _leaves(tree[key])
  else:
    yield tree


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return fake_mnist(str(tmp_path_factory.mktemp("golden-mnist")))


@pytest.mark.parametrize("name", ["seed", "dense"])
def test_a_small_run_gives_its_golden_figures(name, digits, tmp_path):
  config = small_config(digits) if name == "seed" else case_config(digits, "multi")
  if name == "dense":
    config.dense.norm = "none"  # the network without BatchNorm (multi.py's has it)
  final = train_run(config, tmp_path / name)
  got = {k: final[k] for k in GOLDEN[name] if k in final}
  got.update(_checksums(tmp_path / name))
  print(f'"{name}": {got},')
  for key, want in GOLDEN[name].items():
    assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-6), key
