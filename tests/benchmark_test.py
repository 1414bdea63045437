"""experiments/benchmark.py's bookkeeping: the CPU it names and the figures of several rounds."""

import json

import pytest

from experiments import benchmark, cli


def test_cpu_names_the_model_and_only_known_vector_flags():
  c = benchmark.cpu()
  assert c["model_name"] and c["model_name"] != "?"
  assert set(c["flags"]) <= {
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
  }
  with open("/proc/cpuinfo") as f:
    has_avx2 = " avx2 " in f"{f.read()} ".replace("\n", " ")
  assert ("avx2" in c["flags"]) == has_avx2


def test_rounds_give_the_median_of_each_figure_and_keep_every_round():
  rounds = [
    {"images_per_s": 900.0, "backend": "cpu", "onednn": False},
    {"images_per_s": 700.0, "backend": "cpu", "onednn": False},
    {"images_per_s": 800.0, "backend": "cpu", "onednn": False},
  ]
  merged = benchmark._median_of(rounds)
  assert merged["images_per_s"] == 800.0
  assert merged["backend"] == "cpu" and merged["onednn"] is False  # not averaged
  assert merged["rounds"] == rounds
  assert benchmark._median_of(rounds[:1]) == rounds[0]  # one round: as it was


def test_ratios_divide_jaxloc_by_keras_round_by_round():
  runs = {
    "train_jaxloc": [{"images_per_s": 900.0}, {"images_per_s": 600.0}, {"images_per_s": 800.0}],
    "train_keras": [{"images_per_s": 600.0}, {"images_per_s": 600.0}, {"skipped": "no tf"}],
  }
  r = benchmark._ratios(runs)
  assert r["jaxloc_vs_train_keras"]["rounds"] == pytest.approx([1.5, 1.0])  # skipped round out
  assert r["jaxloc_vs_train_keras"]["median"] == pytest.approx(1.25)
  assert "jaxloc_vs_train_keras_onednn" not in r


def test_an_out_file_in_a_missing_folder_is_written(tmp_path):
  path = tmp_path / "runs" / "speed.json"
  cli.write_json(str(path), {"train_jaxloc": {"images_per_s": 1.0}})
  assert json.loads(path.read_text()) == {"train_jaxloc": {"images_per_s": 1.0}}
