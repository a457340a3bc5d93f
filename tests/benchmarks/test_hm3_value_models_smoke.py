"""Smoke test of benchmarks/hm3_value_models.py on a synthetic result file, and of its summary parser."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def vm():
    return load_script("hm3_value_models")


def test_parse_reads_the_path_and_the_weights(vm) -> None:
    assert vm.parse("task_arithmetic w=[.5,1,0] layers=4:MM0b-2--") == ([1, 1, 3, 2, 0, 5, 0, 0], [0.5, 1.0, 0.0])
    assert vm.parse("task_arithmetic w=[.25,,.75] layers=1:-------1") == ([0] * 7 + [4], [0.25, 0.0, 0.75])
    with pytest.raises(ValueError, match="not a layer-space summary"):
        vm.parse("ties w=[.5,.5,.5]")


def test_a_learnable_run_is_predicted_well(vm, tmp_path) -> None:
    """Objectives that add up over slots (plus a weight term) are ranked well from 30 plans; a parser that mixed up
    paths and weights, or the plans' order, would leave the ranks near 0."""
    rng = np.random.default_rng(0)
    cost = rng.random((8, 6))  # per slot and choice
    summaries, values = [], []
    for _ in range(45):
        path, w = rng.integers(0, 6, 8), rng.integers(0, 101, 3) / 100
        s = cost[np.arange(8), path].sum()
        values.append([1 - s / 8, w[0], 1 - w[1], 100 * s + 10 * w[2]])
        summaries.append("task_arithmetic w=[" + ",".join(f"{x:g}" for x in w) + "] layers=8:"
                         + "".join(vm.PATH_CHARS[c] for c in path))
    f = tmp_path / "hm3.json"
    f.write_text(json.dumps({"runs": {"hm3": [{"seed": 0, "summaries": summaries, "values": values}],
                                      "random": [{"seed": 0, "summaries": summaries[:3], "values": values[:3]}]}}))
    out = vm.main([str(f), "--ks", "30", "--horizon", "15", "--models", "ours", "--out", str(tmp_path / "o.json")])
    assert out["fits"] == 1  # the random run is not read
    rho = out["summary"]["ours"]["spearman"]
    assert min(rho) > 0.6 and rho[1] > 0.9  # objective 1 is a weight alone
    assert json.loads((tmp_path / "o.json").read_text())["summary"] == out["summary"]
