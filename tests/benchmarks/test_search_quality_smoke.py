"""Smoke test of benchmarks/search_quality.py on a tiny demo build, plus closed-form checks of its helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergesearch.demo.build import Recipe, build_demo
from tests.benchmarks.script import load_script

TINY = Recipe(length=4, layers=1, hidden=16, base_steps=3, base_warmup=1, expert_steps=2, expert_warmup=1)
DIRS = ["maximize", "maximize", "maximize", "minimize"]


@pytest.fixture(scope="module")
def sq():
    return load_script("search_quality")


def test_history_is_the_running_hypervolume(sq) -> None:
    ref = np.array([0.0, 0.0, 0.0, 10.0])
    values = np.array([[0.5, 0.5, 0.5, 5.0], [np.nan] * 4, [0.4, 0.4, 0.4, 6.0], [1.0, 1.0, 1.0, 0.0]])
    h = sq.history(values, DIRS, ref, scale=10.0)
    # box volumes: .5^3 * 5 / 10; a failed and a dominated trial change nothing; then the whole box
    assert h == pytest.approx([0.0625, 0.0625, 0.0625, 1.0])
    assert sq.first_reaching(h, 0.0625) == 1
    assert sq.first_reaching(h, 0.5) == 4
    assert sq.first_reaching(h, 1.5) is None


def test_weak_dominance(sq) -> None:
    front = np.array([[0.8, 0.5, 0.9, 200.0]])
    assert sq.weakly_dominated(np.array([0.8, 0.5, 0.9, 200.0]), front, DIRS)  # equal counts
    assert sq.weakly_dominated(np.array([0.7, 0.5, 0.9, 250.0]), front, DIRS)
    assert not sq.weakly_dominated(np.array([0.7, 0.5, 0.9, 150.0]), front, DIRS)  # cheaper baseline
    assert not sq.weakly_dominated(np.array([0.7, 0.6, 0.9, 250.0]), front, DIRS)
    assert not sq.weakly_dominated(np.array([0.0, 0.0, 0.0, 0.0]), np.zeros((0, 4)), DIRS)


def test_strict_dominance_needs_one_strictly_better_objective(sq) -> None:
    front = np.array([[0.8, 0.5, 0.9, 200.0]])
    assert not sq.strictly_dominated(np.array([0.8, 0.5, 0.9, 200.0]), front, DIRS)  # equal: weak only
    assert sq.strictly_dominated(np.array([0.8, 0.5, 0.9, 201.0]), front, DIRS)
    assert sq.strictly_dominated(np.array([0.8, 0.4, 0.9, 200.0]), front, DIRS)
    assert not sq.strictly_dominated(np.array([0.8, 0.6, 0.9, 300.0]), front, DIRS)


def test_dominance_counts_seeds_and_separates_the_initial_points(sq) -> None:
    base = {"b": np.array([0.8, 0.5, 0.9, 200.0])}
    recipe, better, worse = [0.8, 0.5, 0.9, 200.0], [0.8, 0.5, 0.9, 199.0], [0.1, 0.1, 0.1, 400.0]
    runs = [{"values": [recipe, worse, better]},  # seed 0: a searched point beats the recipe at evaluation 3
            {"values": [recipe, [np.nan] * 4, worse]}]  # seed 1: only the recipe itself covers it
    d = sq.dominance(runs, base, DIRS, np.array([0.0, 0.0, 0.0, 500.0]), 3, 1, "gp")
    v = d["per_baseline"]["b"]
    assert (v["dominated_in_seeds"], v["strictly_in_seeds"], v["by_search_in_seeds"], v["seeds"]) == (2, 1, 1, 2)
    assert v["epsilon"] == 0.0 and d["target_met"] and not d["target_met_strictly"]
    early = sq.dominance(runs, base, DIRS, np.array([0.0, 0.0, 0.0, 500.0]), 2, 1, "gp")["per_baseline"]["b"]
    assert early["strictly_in_seeds"] == 0  # the better point comes after the first two evaluations
    none = sq.dominance(runs, base, DIRS, np.array([0.0, 0.0, 0.0, 500.0]), 3, 3, "gp")["per_baseline"]["b"]
    assert none["by_search_in_seeds"] == 0 and none["dominated_in_seeds"] == 2


def _space(**kw):
    from mergesearch.config import SpaceConfig
    from mergesearch.spaces import build_space

    return build_space(SpaceConfig(**kw), base_model="base", models=["a", "b"], num_layers=2)


def test_recipe_params_places_a_baseline_in_a_space_or_says_it_is_outside(sq) -> None:
    from mergesearch.config import Range

    recipes = sq.baseline_recipes()
    weights = _space(methods=["task_arithmetic"], granularity="per_layer", filters=["mlp"],
                     weight=Range(low=0.0, high=1.0))
    ta = sq.recipe_params(weights, *recipes["task_arithmetic w=0.3"])
    assert ta == {f"weight.{i}.{g}.{f}": 0.3 for i in range(2) for g in range(2) for f in ("mlp", "rest")}
    assert sq.recipe_params(weights, *recipes["ties d=0.5 λ=0.3"]) is None  # method not searched
    ties = _space(methods=["task_arithmetic", "ties"], weight=Range(low=0.0, high=1.0),
                  density=Range(low=0.1, high=1.0), lambda_=Range(low=0.0, high=1.0))
    assert sq.recipe_params(ties, *recipes["ties d=0.5 λ=0.3"]) == {
        "method": "ties", "lambda": 0.3, "weight.0": 1.0, "weight.1": 1.0, "density.0": 0.5, "density.1": 0.5}
    no_lambda = _space(methods=["ties"], weight=Range(low=0.0, high=1.0), density=Range(low=0.1, high=1.0))
    assert sq.recipe_params(no_lambda, *recipes["ties d=0.5 λ=0.3"]) is None  # λ fixed at 1 there
    assert sq.recipe_params(no_lambda, *recipes["ties d=0.5 λ=1.0"]) is not None
    narrow = _space(methods=["task_arithmetic"], weight=Range(low=0.0, high=0.5))
    assert sq.recipe_params(narrow, *recipes["task_arithmetic w=0.6"]) is None  # outside the range


def test_shortfall_is_zero_exactly_when_dominated(sq) -> None:
    sides = np.array([1.0, 1.0, 1.0, 100.0])
    front = np.array([[0.8, 0.5, 0.9, 200.0], [0.9, 0.6, 0.95, 300.0]])
    assert sq.shortfall(np.array([0.8, 0.5, 0.9, 250.0]), front, DIRS, sides) == 0.0
    # first row: 0.1 short on swap; second row: 50 (0.5 side units) too costly -> 0.1
    assert sq.shortfall(np.array([0.8, 0.6, 0.9, 250.0]), front, DIRS, sides) == pytest.approx(0.1)
    assert sq.shortfall(np.array([0.8, 0.5, 0.9, 190.0]), front, DIRS, sides) == pytest.approx(0.1)
    assert sq.shortfall(np.zeros(4), np.zeros((0, 4)), DIRS, sides) == float("inf")
    assert sq.box_sides(np.array([0.0, 0.0, 0.0, 50.0]), DIRS).tolist() == [1.0, 1.0, 1.0, 50.0]


def test_add_runs_keeps_existing_pairs(sq) -> None:
    runs = {"gp": [{"seed": 0, "tag": "mine"}]}
    sq.add_runs(runs, {"gp": [{"seed": 0, "tag": "theirs"}, {"seed": 1, "tag": "theirs"}], "tpe": [{"seed": 0}]})
    assert [(r["seed"], r.get("tag")) for r in runs["gp"]] == [(0, "mine"), (1, "theirs")]
    assert len(runs["tpe"]) == 1


def test_bad_budget_flag(sq) -> None:
    with pytest.raises(SystemExit):
        sq.parse_args(["--optimizers", "random", "--budget-for", "tpe=5"])
    assert sq.parse_args(["--optimizers", "random,tpe", "--budget-for", "tpe=5"]).budgets == {"random": 180,
                                                                                             "tpe": 5}


@pytest.mark.slow  # ~20 s on an idle machine (tiny demo build + imports), a minute when the cores are busy
def test_tiny_run_writes_results(sq, tmp_path) -> None:
    threads = torch.get_num_threads()
    demo = tmp_path / "demo"
    build_demo(demo, seed=0, recipe=TINY)
    common = ["--demo-dir", str(demo), "--seeds", "2", "--budget", "4"]
    try:  # two invocations, as two parallel processes would be run, then merged
        sq.main([*common, "--out", str(tmp_path / "other"), "--optimizers", "random", "--reach", "8",
                 "--reach-local", "2"])
        record = sq.main([*common, "--out", str(tmp_path / "out"), "--optimizers", "random,tpe",
                          "--merge", str(tmp_path / "other" / "search_quality.json")])
        seeded = sq.main([*common, "--out", str(tmp_path / "init"), "--optimizers", "tpe", "--seeds", "1",
                          "--initial"])
        refined = sq.main(["--demo-dir", str(demo), "--seeds", "1", "--budget", "13", "--out", str(tmp_path / "ref"),
                           "--optimizers", "tpe", "--initial", "--refine", "3", "--held-out"])
    finally:
        torch.set_num_threads(threads)
    # the baselines inside the space (task arithmetic) are the first trials, in order
    assert seeded["initial"] == [f"task_arithmetic w={lam}" for lam in sq.LAMBDAS]
    assert seeded["runs"]["tpe"][0]["values"] == [seeded["baselines"][b] for b in seeded["initial"][:4]]
    seeded_per = seeded["summary"]["baseline_dominance"]["per_baseline"]
    for b in seeded["initial"][:4]:  # in the front only as initial points: nothing searched dominates them
        assert (seeded_per[b]["dominated_in_seeds"], seeded_per[b]["by_search_in_seeds"]) == (1, 0)
    # refinements: the 3 trials after the 10 recipes; each moves some recipe's weights by a few thousandths
    plans = refined["runs"]["tpe"][0]["plans"]
    weights = np.array([[m["parameters"]["weight"] for m in p["models"]] for p in plans])
    assert all(np.abs(weights[:10] - w).max(axis=1).min() < 0.02 for w in weights[10:])
    held = refined["summary"]["held_out"]
    assert set(held) == set(refined["baselines"])
    for b, v in held.items():  # l1 does not depend on the split: the re-scored cost is the searched one
        assert v["test"][3] == pytest.approx(refined["baselines"][b][3])
        for c in v["checks"]:
            assert c["test"][3] == pytest.approx(refined["runs"]["tpe"][0]["values"][c["trial"]][3])
    other = json.loads((tmp_path / "other" / "search_quality.json").read_text())
    saved = json.loads((tmp_path / "out" / "search_quality.json").read_text())
    assert (tmp_path / "out" / "search_quality.png").stat().st_size > 1000
    assert saved["space"] == "weights" and saved["merged_from"]
    assert saved["reference_point"]["l1"] == pytest.approx(1.1 * saved["baselines"]["task_arithmetic w=1.0"][3])
    assert set(saved["runs"]) == {"random", "tpe"} and not saved["errors"]
    assert saved["runs"]["random"] == other["runs"]["random"]  # merged, not run again
    reach = saved["reachability"]  # 8 Sobol points + 2 around each baseline inside the space (task arithmetic)
    assert reach["local_around"] == [f"task_arithmetic w={lam}" for lam in sq.LAMBDAS]
    assert reach["points"] == 8 and len(reach["values"]) == 8 + 2 * 10
    l1 = np.array(reach["values"])[8:, 3].reshape(10, 2)  # local points stay near their baseline's cost
    assert l1[0].max() < 0.5 * l1[-1].min()
    for runs in record["runs"].values():
        assert len(runs) == 2
        for r in runs:
            assert len(r["hv"]) == 4 and np.all(np.diff(r["hv"]) >= 0) and 0 <= r["hv"][-1] <= 1
    assert saved["summary"]["best_multi_objective"]["optimizer"] == "tpe"
    per = saved["summary"]["baseline_dominance"]["per_baseline"]
    assert len(per) == 20
    assert all((v["epsilon"] == 0) == (v["dominated_in_seeds"] == v["seeds"]) for v in per.values())
    assert set(saved["summary"]["reachability"]["per_baseline"]) == set(per)
    alone = [b for b, v in saved["summary"]["reachability"]["per_baseline"].items() if v["dominated_by"] == 0]
    assert f"baselines that no reachable point dominates: {', '.join(alone) or 'none'}" in saved["table"]
    try:  # a --merge that runs nothing new, into a new directory, keeps every run
        sq.main([*common, "--out", str(tmp_path / "new"), "--optimizers", "random,tpe",
                 "--merge", str(tmp_path / "out" / "search_quality.json")])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "new" / "search_quality.json").read_text())["runs"] == saved["runs"]
