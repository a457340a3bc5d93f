"""Plan resolution (gradients, filters, slices) and the YAML round trip."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.plan import MergePlan, parse_plan, plan_to_yaml
from mergesearch.merging.resolve import evaluate, resolve

KINDS = ("self_attn.q_proj.weight", "mlp.up_proj.weight")


@dataclass
class Info:
    num_layers: int
    shapes: dict = field(default_factory=dict)
    integer: set = field(default_factory=set)

    def __post_init__(self):
        self.shapes = {"model.embed_tokens.weight": (8, 4)}
        for i in range(self.num_layers):
            self.shapes.update({f"model.layers.{i}.{k}": (4, 4) for k in KINDS})
        self.shapes.update({"model.norm.weight": (4,), "lm_head.weight": (8, 4)})


def infos(n=5):
    return {m: Info(n) for m in ("base", "a", "b")}


def test_gradient_interpolation_and_filters():
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate(0.3, "x", 0.5) == 0.3
    plan = parse_plan("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: mlp, value: 2},"
                      " {filter: '*', value: 1}]}}]")
    flt = plan.models[0].parameters["weight"]
    assert evaluate(flt, "model.layers.0.mlp.up_proj.weight", 0) == 2.0
    assert evaluate(flt, "model.layers.0.self_attn.q_proj.weight", 0) == 1.0


def test_resolve_gradient_per_layer_and_embeddings_at_first_value():
    plan = MergePlan.model_validate({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0.0, 1.0, 0.0]}},
                   {"model": "b", "parameters": {"weight": 0.5}}]})
    jobs = {j.name: j for j in resolve(plan, infos(5), "base").jobs}
    # 5 layers: t = 0, .25, .5, .75, 1 -> weight 0, .5, 1, .5, 0 on the gradient [0, 1, 0]
    got = [jobs[f"model.layers.{i}.mlp.up_proj.weight"].per_input[0]["weight"] for i in range(5)]
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert jobs[name].per_input[0]["weight"] == 0.0
    j = jobs["model.layers.0.mlp.up_proj.weight"]
    assert [m for m, _ in j.inputs] == ["a", "b", "base"] and j.base_index == 2  # base appended, like mergekit


def test_frankenmerge_layer_map():
    plan = MergePlan.model_validate({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4]}]}]})
    res = resolve(plan, infos(4), "base")
    assert res.layer_map == [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3)]
    jobs = {j.name: j for j in res.jobs}
    assert jobs["model.layers.4.mlp.up_proj.weight"].inputs == (("b", "model.layers.2.mlp.up_proj.weight"),)
    assert jobs["model.embed_tokens.weight"].inputs == (("a", "model.embed_tokens.weight"),)
    assert jobs["lm_head.weight"].inputs == (("b", "lm_head.weight"),)
    assert sum(j.name.startswith("model.layers.") for j in res.jobs) == 6 * len(KINDS)


@pytest.mark.parametrize(("plan", "match"), [
    ({"merge_method": "nope", "models": [{"model": "a"}]}, "unknown merge_method 'nope'"),
    ({"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters":
                                                               {"weight": 1, "density": 1.5}}]}, "density"),
    ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}, "missing parameter 'weight'"),
    ({"merge_method": "slerp", "base_model": "base", "parameters": {"t": 0.5},
      "models": [{"model": "a"}, {"model": "b"}]}, "slerp"),
    ({"merge_method": "model_stock", "base_model": "base", "models": [{"model": "a"}]}, "at least 3"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [2, 9]}]}]},
     r"slice 0: layer_range \[2, 9\] of model 'a'"),
])
def test_bad_plans(plan, match):
    with pytest.raises(ConfigError, match=match):
        resolve(MergePlan.model_validate(plan), infos(4), "base")


def test_yaml_round_trip_and_strict_export():
    text = """
merge_method: dare_ties
base_model: base
models:
  - model: a
    parameters: {weight: [0.1, 0.9], density: [{filter: mlp, value: 0.3}, {value: 0.7}]}
  - model: b
    parameters: {weight: 0.5}
parameters: {lambda: 1.2, normalize: true}
dtype: float32
random_seed: 7
"""
    plan = parse_plan(text)
    again = parse_plan(plan_to_yaml(plan))
    assert again == plan
    a, b = resolve(plan, infos(), "base"), resolve(again, infos(), "base")
    assert a.jobs == b.jobs
    assert "random_seed" not in plan_to_yaml(plan, strict_mergekit=True)


def test_malformed_yaml_names_line():
    with pytest.raises(ConfigError, match=r"cfg.yml:\d+: malformed YAML"):
        parse_plan("merge_method: ties\nmodels:\n  - model: [a\n", "cfg.yml")
    with pytest.raises(ConfigError, match="models"):
        parse_plan("merge_method: ties\nmodels: 3\n", "cfg.yml")


def test_invdensity_exports_as_mergekit_dare_with_weights_over_density(tiny_models, tmp_path):
    """mergekit has no 1/d variant: its DARE with rescale off and weights w/d is the same merge."""
    from mergesearch.merging.plan import mergekit_equivalent
    from mergesearch.merging.run import merge_plan_tensors, open_models

    base = str(tiny_models["base"])
    plan = MergePlan.model_validate({
        "merge_method": "dare_ties_invdensity", "base_model": base, "random_seed": 2, "parameters": {"lambda": 0.8},
        "models": [{"model": str(tiny_models[k]), "parameters": {"weight": w, "density": 0.4}}
                   for k, w in (("a", 0.6), ("b", 1.2))]})
    eq, why = mergekit_equivalent(plan)
    assert why == "" and eq.merge_method == "dare_ties" and eq.parameters["rescale"] is False
    assert [m.parameters["weight"] for m in eq.models] == pytest.approx([1.5, 3.0])
    names, models = open_models(plan)
    _, ours = merge_plan_tensors(plan, names, models)
    _, theirs = merge_plan_tensors(eq, names, models)  # same seed: same masks, so the same merge
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-7)
    # a gradient weight cannot be divided exactly: no file, a note in recipe.yaml instead
    grad = plan.model_copy(update={"models": [m.model_copy(update={"parameters": {"weight": [0.2, 0.9],
                                                                                   "density": 0.4}})
                                              for m in plan.models]})
    assert mergekit_equivalent(grad)[0] is None
    from mergesearch.merging.run import write_recipe

    write_recipe(grad, tmp_path)
    assert not (tmp_path / "mergekit_config.yml").exists()
    assert (tmp_path / "recipe.yaml").read_text().startswith("# no mergekit_config.yml: dare_ties_invdensity")
    assert parse_plan((tmp_path / "recipe.yaml").read_text()) == grad
