"""Layer-wise architecture choices: slots -> slices, repair to [min_layers, max_layers], depth offsets."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.config import SpaceConfig
from mergesearch.merging.plan import MergePlan
from mergesearch.spaces import build_space
from mergesearch.spaces.space import recipe_parameter

MODELS = ["/m/a", "/m/b"]


def space(num_layers: int = 4, method: str = "ties", **layers):
    cfg = SpaceConfig.model_validate({"methods": [method], "granularity": "per_layer", "layers": layers})
    return build_space(cfg, base_model="/m/base", models=MODELS, num_layers=num_layers)


def slots(sp, choices: list[str], offsets: list[int] | None = None) -> dict:
    # random weights and densities (distinct per layer), then the slots under test
    p = sp.from_unit(np.random.default_rng(0).random(len(sp.distributions)))
    p.update({f"layer.{k}": c for k, c in enumerate(choices)})
    p.update({f"layer_offset.{k}": o for k, o in enumerate(offsets or [0] * len(choices))})
    p = {k: v for k, v in p.items() if k in sp.distributions}
    return sp.complete(p)


def output_layers(plan: MergePlan) -> int:
    return sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in plan.slices)


def test_slices_point_at_the_right_models_and_layers():
    sp = space(choices=["merged", "base", "a", "skip"])
    p = slots(sp, ["merged", "merged", "a", "base"])
    plan = sp.decode(p)
    assert plan.merge_method == "ties" and output_layers(plan) == 4
    merged, copy_a, copy_base = plan.slices
    # two consecutive merged slots with contiguous depths coalesce into one slice [0, 2)
    assert [(s.model, s.layer_range) for s in merged.sources] == [
        ("/m/base", (0, 2)), ("/m/a", (0, 2)), ("/m/b", (0, 2))]
    assert merged.base_model == "/m/base" and merged.sources[0].parameters is None
    w = merged.sources[1].parameters["weight"]
    assert w == [p["weight.0.0"], p["weight.0.1"]]  # the slice's gradient: one exact entry per layer
    assert [(s.model, s.layer_range) for s in copy_a.sources] == [("/m/a", (2, 3))]
    assert [(s.model, s.layer_range) for s in copy_base.sources] == [("/m/base", (3, 4))]
    assert MergePlan.model_validate(plan.to_dict()) == plan


def test_single_layer_merged_slice_uses_that_layers_values():
    sp = space(choices=["merged", "skip"])
    p = slots(sp, ["skip", "skip", "merged", "skip"])
    plan = sp.decode(p)
    (only,) = plan.slices
    assert only.sources[2].layer_range == (2, 3)
    assert only.sources[2].parameters == {"weight": p["weight.1.2"], "density": p["density.1.2"]}


def test_copies_only_become_passthrough():
    sp = space(choices=["a", "b", "skip"])
    plan = sp.decode(slots(sp, ["a", "a", "b", "skip"]))
    assert plan.merge_method == "passthrough" and plan.base_model is None and plan.parameters is None
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in plan.slices] == [("/m/a", (0, 2)),
                                                                                    ("/m/b", (2, 3))]


def test_passthrough_method_copies_base_for_merged():
    sp = space(method="passthrough", choices=["merged", "a", "skip"])
    plan = sp.decode(slots(sp, ["merged", "a", "merged", "merged"]))
    assert plan.merge_method == "passthrough"
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in plan.slices] == [
        ("/m/base", (0, 1)), ("/m/a", (1, 2)), ("/m/base", (2, 4))]


def test_repair_unskips_earliest_and_skips_latest():
    sp = space(choices=["merged", "base", "skip"], min_layers=2, max_layers=3)
    plan = sp.decode(slots(sp, ["skip", "skip", "skip", "base"]))
    assert sp.summary(slots(sp, ["skip", "skip", "skip", "base"])).endswith("layers=2:M--b")
    assert output_layers(plan) == 2
    p = slots(sp, ["base", "merged", "base", "merged"])
    assert sp.summary(p).endswith("layers=3:bMb-")
    assert output_layers(sp.decode(p)) == 3


def test_fill_without_merged_is_first_non_skip_choice():
    sp = space(choices=["skip", "b", "base"], min_layers=1)
    plan = sp.decode(slots(sp, ["skip"] * 4))
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in plan.slices] == [("/m/b", (0, 1))]


def test_depth_offset_clamps_and_repeats():
    sp = space(num_layers=3, choices=["merged", "base", "skip"], slots=6, depth_offset=2)
    assert "layer_offset.5" in sp.distributions and sp.distributions["layer_offset.0"].low == -2
    # slots 0..5 sit at depths 0,1,2,0,1,2; offsets move them within [0, 2]
    plan = sp.decode(slots(sp, ["base"] * 6, [-2, 0, 2, 1, 2, -2]))
    ranges = [s.sources[0].layer_range for s in plan.slices]
    # depths: 0, 1, 2, 1, 2, 0 -> runs [0,3), [1,3), [0,1)
    assert ranges == [(0, 3), (1, 3), (0, 1)] and output_layers(plan) == 6


@pytest.mark.parametrize(("lo", "hi"), [(1, 4), (2, 2), (3, 5), (5, 8)])
def test_bounds_hold_on_random_params(lo, hi):
    sp = space(num_layers=4, choices=["merged", "base", "a", "skip"], slots=8, min_layers=lo, max_layers=hi,
               depth_offset=1)
    rng = np.random.default_rng(lo * 10 + hi)
    for _ in range(100):
        p = sp.from_unit(rng.random(len(sp.distributions)))
        plan = sp.decode(p)
        n = output_layers(plan)
        kept = [k for k in range(8) if p[f"layer.{k}"] != "skip"]
        assert lo <= n <= hi
        assert n == min(hi, max(lo, len(kept)))
        for s in plan.slices:
            a, b = s.sources[0].layer_range
            assert 0 <= a < b <= 4
            assert all(src.layer_range == (a, b) for src in s.sources)


def test_models_named_by_index_folder_or_path():
    cfg = SpaceConfig.model_validate({"layers": {"choices": ["merged", 1, "a", "skip"]}})
    assert cfg.layers.choices == ["merged", "1", "a", "skip"]
    sp = build_space(cfg, base_model="/m/base", models=MODELS, num_layers=2)
    plan = sp.decode(sp.complete({"layer.0": "1", "layer.1": "a"}))
    assert [s.sources[0].model for s in plan.slices] == ["/m/b", "/m/a"]
    by_path = SpaceConfig.model_validate({"layers": {"choices": ["/m/b", "skip"]}})
    sp = build_space(by_path, base_model="/m/base", models=MODELS, num_layers=2)
    assert sp.decode(sp.complete({"layer.0": "/m/b"})).slices[0].sources[0].model == "/m/b"


def test_recipe_parameters_change_only_paths_with_a_merged_slot():
    """What hm3's plan identity relies on: without a merged slot the plan is a passthrough of copies, whatever
    the method, weights, densities and λ; with one, they change it. Layer offsets matter either way."""
    cfg = SpaceConfig.model_validate({"methods": ["ties", "dare_linear"], "granularity": "per_layer",
                                      "lambda": {"low": 0.5, "high": 1.5},
                                      "layers": {"choices": ["merged", "base", "a", "skip"], "depth_offset": 1}})
    sp = build_space(cfg, base_model="/m/base", models=MODELS, num_layers=4)
    recipe = {n for n in sp.distributions if recipe_parameter(n)}
    assert recipe == {n for n in sp.distributions if not n.startswith(("layer.", "layer_offset."))}
    assert {"method", "lambda"} <= recipe and any(n.startswith("density.") for n in recipe)
    rng = np.random.default_rng(3)
    for path, inert in [(["a", "base", "skip", "a"], True), (["a", "merged", "skip", "a"], False)]:
        p = sp.from_unit(rng.random(len(sp.distributions)))
        p.update({f"layer.{k}": c for k, c in enumerate(path)})
        other = sp.from_unit(rng.random(len(sp.distributions)))
        q = {**p, **{n: other[n] for n in recipe}, "method": "dare_linear" if p["method"] == "ties" else "ties"}
        assert (sp.decode(p) == sp.decode(q)) is inert
        moved = {**p, "layer_offset.1": 0 if p["layer_offset.1"] else 1}  # slot 1 is kept, depth 1 ± 1
        assert sp.decode(moved) != sp.decode(p)
