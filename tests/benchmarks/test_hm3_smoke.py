"""Smoke test of benchmarks/hm3.py on a tiny demo build, plus closed-form checks of its helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergesearch.demo.build import Recipe, build_demo
from tests.benchmarks.script import load_script

TINY = Recipe(length=4, layers=1, hidden=16, base_steps=3, base_warmup=1, expert_steps=2, expert_warmup=1)
DIRS = ["maximize", "maximize", "maximize", "minimize"]
HM3_TINY = {"n_startup": 4, "steps": 6, "update_steps": 2, "hidden": 16}


@pytest.fixture(scope="module")
def hb():
    return load_script("hm3")


def test_history_is_the_running_hypervolume(hb) -> None:
    ref = np.array([0.0, 0.0, 0.0, 10.0])
    values = np.array([[0.5, 0.5, 0.5, 5.0], [np.nan] * 4, [0.4, 0.4, 0.4, 6.0], [1.0, 1.0, 1.0, 0.0]])
    # box volumes: .5^3 * 5 / 10; a failed and a dominated trial change nothing; then the whole box
    assert hb.history(values, DIRS, ref, scale=10.0) == pytest.approx([0.0625, 0.0625, 0.0625, 1.0])


def test_preferences_are_fixed_spread_and_on_the_simplex(hb) -> None:
    w = hb.preferences(10, 4)
    assert w.shape == (10, 4) and np.allclose(w.sum(1), 1.0) and (w >= 0).all()
    np.testing.assert_array_equal(w, hb.preferences(10, 4))  # from their own seed only
    assert np.ptp(w, axis=0).min() > 0.3  # every objective is weighed heavily by some preference


def test_top_rank_is_the_top_tenth_of_the_front(hb) -> None:
    assert [hb.top_rank(n) for n in (1, 9, 10, 11, 25, 30)] == [1, 1, 1, 2, 3, 3]


def test_targets(hb) -> None:
    runs = {"hm3": [{"hv": [0.1, 0.3]}, {"hv": [0.2, 0.5]}], "nsga2": [{"hv": [0.3, 0.35]}, {"hv": [0.3, 0.45]}],
            "gp": [{"hv": [0.6]}]}  # gp ran one checkpoint only: not compared at the last one
    suggestions = [{"seed": s, "top": t, "rank": 1 if t else 4, "on_front": True}
                   for s, tops in ((0, [True] * 8 + [False] * 2), (1, [True] * 7 + [False] * 3)) for t in tops]
    out = hb.summarize(runs, suggestions, [1, 2], 10)
    assert out["hypervolume"]["hm3"]["2"]["mean"] == pytest.approx(0.4)
    assert out["target_hv"]["best_other"] == "nsga2" and out["target_hv"]["missing"] == ["gp"]
    # gp's 0.6 after one checkpoint bounds its HV at the second from below: above hm3's 0.4, the target is missed
    assert out["target_hv"]["missing_already_above"] == ["gp"] and not out["target_hv"]["met"]
    assert out["target_suggest"]["top_per_seed"] == {"0": 8, "1": 7} and not out["target_suggest"]["met"]
    text = hb.table(out, [{**s, "weights": {"a": 1.0}, "summary": "", "front_size": 10} for s in suggestions],
                    [1, 2])
    assert "-> NOT met; gp not run to 2: its final HV 0.6000 is a lower bound there, already above hm3" in text
    assert "in every seed (per seed: {'0': 8, '1': 7}) -> NOT met" in text
    runs["gp"] = [{"hv": [0.3]}]
    assert hb.summarize(runs, suggestions, [1, 2], 10)["target_hv"]["met"]  # below hm3: no verdict against it
    assert "target_hv" not in hb.summarize({"hm3": runs["hm3"]}, [], [1, 2], 10)  # alone: compared with nothing


@pytest.mark.slow  # ~30 s on an idle machine (tiny demo build, imports, four tiny searches)
def test_tiny_run_writes_results_and_suggest_replays(hb, tmp_path) -> None:
    from mergesearch.execution.worker import MergeWorker
    from mergesearch.search.loop import objective_specs
    from mergesearch.search.suggest import propose

    threads = torch.get_num_threads()
    demo = tmp_path / "demo"
    build_demo(demo, seed=0, recipe=TINY)
    try:
        record = hb.main(["--demo-dir", str(demo), "--seeds", "1", "--budget", "8", "--optimizers", "hm3,random",
                          "--budget-for", "random=6", "--checkpoints", "4,8", "--preferences", "2",
                          "--limit", "8", "--hm3-options", json.dumps(HM3_TINY), "--out", str(tmp_path / "out")])
        # the run's final networks are what a fresh `mergesearch suggest` rebuilds from the stored trials
        config = hb.demo_config(demo, 8)
        worker = MergeWorker(config)
        names = [n for n, _ in objective_specs(config)]
        ref = hb.reference_point(config, worker, names, DIRS)
        config = config.model_copy(update={"search": config.search.model_copy(update={
            "reference_point": dict(zip(names, map(float, ref), strict=True))})})
        _, run = hb.run_one(config, worker, "hm3", 0, 8, HM3_TINY)
        w = hb.preferences(1, 4)[0]
        fresh = propose(run.study, run.space.distributions, dict(zip(names, w, strict=True)), seed=0,
                        options=HM3_TINY)
        assert run.optimizer.sampler.suggest(run.study, w) == fresh
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "out" / "hm3.json").read_text())
    assert saved["space_config"]["layers"]["slots"] == 2  # 2 x the tiny demo's one layer
    assert saved["space_config"]["layers"]["choices"] == ["merged", "base", "reverse", "swap", "sort", "skip"]
    assert saved["reference_point"]["reverse"] == 0.0 and saved["reference_point"]["l1"] > 0
    assert saved["reference_point"] == record["reference_point"] == dict(zip(names, map(float, ref), strict=True))
    assert saved["budgets"] == {"hm3": 8, "random": 6} and saved["limit"] == 8 and not saved["errors"]
    assert saved["wall_seconds"] > 0 and saved["machine"]["cpus"] >= 1
    for opt, n in (("hm3", 8), ("random", 6)):
        (r,) = saved["runs"][opt]
        assert len(r["hv"]) == n and np.all(np.diff(r["hv"]) >= 0) and 0 <= r["hv"][-1] <= 1
        assert r["fallbacks"] == 0
    # hm3's start-up design begins with the space's source paths: the plain merge, the base, each expert
    assert [s.rsplit(":", 1)[1] for s in saved["runs"]["hm3"][0]["summaries"][:4]] == ["M-", "b-", "0-", "1-"]
    assert len(saved["suggestions"]) == 2
    for s in saved["suggestions"]:
        assert s["seed"] == 0 and abs(sum(s["weights"].values()) - 1) < 1e-9
        assert (s["rank"] is not None) == s["on_front"] and s["front_size"] >= 1
        assert s["top"] == (s["on_front"] and s["rank"] <= hb.top_rank(s["front_size"]))
    hv = saved["summary"]["hypervolume"]
    assert set(hv["hm3"]) == {"4", "8"} and set(hv["random"]) == {"4"}
    assert saved["summary"]["target_hv"]["missing"] == ["random"]
    assert "target: in the top 10%" in saved["table"]
