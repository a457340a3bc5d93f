"""Spaces against the real merge engine: decoded plans merge into loadable models of the planned shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from mergesearch.config import SpaceConfig
from mergesearch.spaces import build_space
from tests.spaces.test_space import _three_expert_methods

run = pytest.importorskip("mergesearch.merging.run", reason="merge engine not available yet")


def merge(plan, tmp_path, name: str):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(plan.to_dict()))
    out = tmp_path / name
    run.merge_config(cfg, out)
    return out


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_layer_choices_give_loadable_models_with_planned_depth(tiny_models, tmp_path):
    experts = [str(tiny_models[k]) for k in "abc"]
    cfg = SpaceConfig.model_validate({"methods": ["ties", "task_arithmetic"], "granularity": "per_layer",
                                      "layers": {"slots": 4, "choices": ["merged", "base", "a", "skip"],
                                                 "min_layers": 1, "max_layers": 4, "depth_offset": 1}})
    sp = build_space(cfg, base_model=str(tiny_models["base"]), models=experts, num_layers=2)
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(4):
        p = sp.from_unit(rng.random(len(sp.distributions)))
        plan = sp.decode(p)
        depth = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in plan.slices)
        model = load(merge(plan, tmp_path, f"m{i}"))
        assert model.config.num_hidden_layers == depth == len(model.model.layers)
        seen.add(depth)
    assert len(seen) > 1  # the draws exercised different depths


def test_per_layer_weights_reach_each_layer_exactly(tiny_models, tmp_path):
    experts = [str(tiny_models[k]) for k in "abc"]
    cfg = SpaceConfig.model_validate({"methods": ["task_arithmetic"], "granularity": "per_layer",
                                      "filters": ["self_attn"], "lambda": [0.5, 1.5]})
    sp = build_space(cfg, base_model=str(tiny_models["base"]), models=experts, num_layers=2)
    p = sp.from_unit(np.random.default_rng(1).random(len(sp.distributions)))
    merged = load(merge(sp.decode(p), tmp_path, "ta")).state_dict()
    base = load(tiny_models["base"]).state_dict()
    ex = [load(e).state_dict() for e in experts]
    for j in range(2):
        for tensor, key in ((f"model.layers.{j}.self_attn.q_proj.weight", "self_attn"),
                            (f"model.layers.{j}.mlp.up_proj.weight", "rest")):
            tau = sum(p[f"weight.{i}.{j}.{key}"] * (ex[i][tensor] - base[tensor]) for i in range(3))
            expected = base[tensor] + p["lambda"] * tau
            torch.testing.assert_close(merged[tensor], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [None, {"choices": ["merged", "base", "skip"], "min_layers": 2}])
def test_every_method_decodes_to_a_plan_the_engine_runs(tiny_models, layers):
    experts = [str(tiny_models[k]) for k in "abc"]
    base = str(tiny_models["base"])
    methods = _three_expert_methods()
    cfg = SpaceConfig.model_validate({"methods": methods, "granularity": "per_layer", "filters": ["mlp"],
                                      "lambda": [0.5, 1.5], "epsilon": [0.05, 0.3], "density": [0.0, 1.0],
                                      "layers": layers})
    sp = build_space(cfg, base_model=base, models=experts, num_layers=2, seed=3)
    p = sp.from_unit(np.random.default_rng(2).random(len(sp.distributions)))
    if layers:
        p.update({"layer.0": "merged", "layer.1": "merged"})  # one merged slice over both layers
    for method in methods:
        plan = sp.decode({**p, "method": method})
        names, models = run.open_models(plan)
        _, tensors = run.merge_plan_tensors(plan, names, models)
        assert all(torch.isfinite(t).all() for t in tensors.values()), method
    slerp = build_space(SpaceConfig.model_validate({"methods": ["slerp"], "t": [0, 1], "layers": layers}),
                        base_model=base, models=experts[:1], num_layers=2)
    plan = slerp.decode(slerp.from_unit(np.full(len(slerp.distributions), 0.3)))
    names, models = run.open_models(plan)
    run.merge_plan_tensors(plan, names, models)
