"""Smoke test of benchmarks/multi_fidelity.py on a tiny demo build, plus its curve helpers in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesearch.demo.build import Recipe, build_demo
from tests.benchmarks.script import load_script

TINY = Recipe(length=4, layers=1, hidden=16, base_steps=3, base_warmup=1, expert_steps=2, expert_warmup=1)


@pytest.fixture(scope="module")
def mf():
    return load_script("multi_fidelity")


def test_examples_axis_helpers(mf) -> None:
    examples = np.array([10, 30, 60, 100])
    hv = np.array([0.1, 0.1, 0.4, 0.5])
    assert mf.examples_to_reach(examples, hv, 0.4) == 60
    assert mf.examples_to_reach(examples, hv, 0.6) is None
    assert mf.hv_at(examples, hv, 5) == 0.0  # nothing finished yet
    assert mf.hv_at(examples, hv, 60) == 0.4 and mf.hv_at(examples, hv, 99) == 0.4


@pytest.mark.slow
def test_tiny_run_writes_results(mf, tmp_path) -> None:
    threads = torch.get_num_threads()
    demo = tmp_path / "demo"
    build_demo(demo, seed=0, recipe=TINY)
    try:
        record = mf.main(["--demo-dir", str(demo), "--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    seed = record["spaces"]["weights"]["per_seed"][0]
    single = record["spaces"]["weights"]["single"][0]
    staged = record["spaces"]["weights"]["rungs"][0]
    assert len(single["states"]) == 4 and set(single["states"]) == {"COMPLETE"}
    assert seed["budget_examples"] == sum(single["examples"])
    # the rungs run stops at (the first trial past) the same budget, and its trials spent fewer examples each
    assert sum(staged["examples"][:-1]) < seed["budget_examples"] <= sum(staged["examples"])
    assert (tmp_path / f"{mf.NAME}.json").is_file()
