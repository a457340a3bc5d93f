"""Closed-form checks of benchmarks/twin_merging.py's pure helpers (normalisation, the <= 10 % selection, the
parameter arithmetic) on hand-made numbers; no model is built."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def tm():
    return load_script("twin_merging")


def test_normalised_divides_by_each_experts_own_accuracy(tm) -> None:
    experts = {"reverse": 0.8, "swap": 0.5, "sort": 1.0}
    ratios = tm.normalised({"reverse": 0.4, "swap": 0.5, "sort": 0.9, "l1": 3.0}, experts)
    assert ratios == pytest.approx({"reverse": 0.5, "swap": 1.0, "sort": 0.9})
    assert tm.weakest(ratios) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="swap"):
        tm.normalised({"reverse": 0.4, "swap": 0.5, "sort": 0.9}, {**experts, "swap": 0.0})


def test_best_point_respects_the_cap_and_breaks_ties_by_cost(tm) -> None:
    points = [{"trial": 1, "weakest": 0.90, "extra": 0.0},
              {"trial": 2, "weakest": 0.97, "extra": 0.104},   # the best, but over 10 %
              {"trial": 3, "weakest": 0.93, "extra": 0.10},    # exactly at the cap: allowed
              {"trial": 4, "weakest": 0.93, "extra": 0.08}]    # same score, cheaper: preferred
    assert tm.best_point(points)["trial"] == 2
    assert tm.best_point(points, 0.10)["trial"] == 4
    assert tm.best_point(points, 0.05)["trial"] == 1
    assert tm.best_point([p for p in points if p["extra"] > 0.05], 0.05) is None
    report = tm.front_report(points)
    assert report["best_under_cap"]["trial"] == 4 and not report["meets_target"]
    assert report["best_by_rank"] == {}  # static points have no rank
    ranked = [{**p, "rank": 1 + (p["extra"] > 0.09)} for p in points]
    assert tm.front_report(ranked)["best_by_rank"] == {"1": [0.93, 0.08, 4], "2": [0.97, 0.104, 2]}
    assert tm.front_report([{"trial": 5, "weakest": 0.95, "extra": 0.09}])["meets_target"]


def test_parameter_arithmetic_of_the_demo_model(tm) -> None:
    # one decoder layer of the demo's shape (hidden 64, MLP 128), plus tensors the factors do not cover
    shapes = {"model.embed_tokens.weight": (24, 64), "lm_head.weight": (24, 64), "model.norm.weight": (64,),
              "model.layers.0.input_layernorm.weight": (64,),
              **{f"model.layers.0.self_attn.{p}_proj.weight": (64, 64) for p in "qkvo"},
              "model.layers.0.mlp.gate_proj.weight": (128, 64), "model.layers.0.mlp.up_proj.weight": (128, 64),
              "model.layers.0.mlp.down_proj.weight": (64, 128)}
    per_rank = tm.factor_params_per_rank(shapes, 3)
    assert per_rank == 3 * (4 * 128 + 3 * 192)  # T * sum(out + in) over the 7 linear weights
    assert tm.router_params(64, 64, 3) == 64 * 64 + 64 + 64 * 3 + 3
    assert tm.router_extra(64, 64, 3) == tm.router_params(64, 64, 3) + 2 * 64  # + standardisation mean, scale
    static = 1000 * per_rank
    assert tm.true_extra_ratio(2, per_rank, 10, static) == pytest.approx((2 * per_rank + 10) / static)
    assert tm.max_rank_under(0.10, per_rank, 10, static) == 99  # 100 * per_rank + 10 is just over the cap
    assert tm.max_rank_under(0.10, per_rank, static, static) == -1  # the router alone is over


def test_timing_summary_means_per_trial(tm) -> None:
    got = tm.timing_summary([{"merge": 1.0, "eval": 2.0, "queue": 9.0}, {"merge": 3.0, "eval": 4.0}, {"queue": 1.0}])
    assert got == pytest.approx({"trials": 2, "merge": 2.0, "eval": 3.0, "total": 5.0})
    assert tm.timing_summary([]) == {"trials": 0}
