"""Smoke test of benchmarks/multi_fidelity.py on a tiny demo build, its curve helpers in closed form, and its
oracle (rungs that report full scores at the rungs' cost)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergesearch.config import load_config
from mergesearch.demo.build import Recipe, build_demo
from mergesearch.objectives import ObjectiveContext, build_objectives
from mergesearch.search.fidelity import Rungs
from tests.benchmarks.script import load_script
from tests.conftest import write_job

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


def test_tasks_only_keeps_the_objectives_that_score_examples(mf, tiny_models, tmp_path) -> None:
    config = load_config(write_job(tmp_path, tiny_models))
    assert any(o.data is None for o in config.objectives)  # the job has a cost objective to drop
    kept = mf.tasks_only(config).objectives
    assert [o.name for o in kept] == [o.name for o in config.objectives if o.data is not None] and kept


def test_oracle_reports_full_scores_at_the_rungs_cost(mf, tiny_models, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mergesearch.objectives.registry as registry

    config = load_config(write_job(tmp_path, tiny_models))
    objectives = build_objectives(config.objectives[:2], ObjectiveContext())  # 8 examples each
    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"])
    tok = AutoTokenizer.from_pretrained(tiny_models["a"])
    names = tuple(o.name for o in objectives)
    full = registry.evaluate_staged(objectives, model, tok).values
    staged = registry.evaluate_staged(objectives, model, tok, Rungs((2, 4), 1 / 3, names, (-1.0, -1.0)))
    assert staged.rungs[0] != full  # 2 of 8 examples: the rung's own scores differ from the full ones here
    original = registry.evaluate_staged
    with mf.oracle_scores():
        exact = registry.evaluate_staged(objectives, model, tok, Rungs((2, 4), 1 / 3, names, (-1.0, -1.0)))
        # promotion sees the full scores: a vector just below them at rung 0 is behind, one just above ahead
        below = tuple(v - 1e-6 for v in full.values())
        above = tuple(v + 1e-6 for v in full.values())
        kept = registry.evaluate_staged(objectives, model, tok, Rungs((2, 4), 0.2, names, (-1.0, -1.0),
                                                                      seen=((below,) * 4,)))
        stopped = registry.evaluate_staged(objectives, model, tok, Rungs((2, 4), 0.2, names, (-1.0, -1.0),
                                                                         seen=((above,) * 4,)))
    assert registry.evaluate_staged is original
    assert exact.rungs == [full, full] and exact.values == full
    assert exact.examples == staged.examples == 16  # counted as the rungs', not once more for the full scores
    assert kept.values == full and stopped.values is None
    assert stopped.rungs == [full] and stopped.examples == 4


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
