"""Factors on chosen modules and layers only (PEFT target_modules / layers_to_transform): exact cost, exact PEFT
round trip, one-line errors for names that select nothing."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.twin.factors import compute_factors, extra_params, select_targets
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import Router
from tests.twin.conftest import EXPERTS, batch

WEIGHTS = [f"model.layers.{i}.{part}.weight" for i in range(3)
           for part in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]


def test_select_targets_follows_peft_suffix_rule():
    assert select_targets(WEIGHTS) == WEIGHTS
    assert select_targets(WEIGHTS, ["q_proj"]) == [w for w in WEIGHTS if "q_proj" in w]
    # a suffix matches at a dot boundary only: "proj" is not the name of any module
    with pytest.raises(ConfigError, match="module 'proj' matches no linear module"):
        select_targets(WEIGHTS, ["proj"])
    assert select_targets(WEIGHTS, ["mlp.down_proj", "self_attn.k_proj"], [0, 2]) == [
        "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight",
        "model.layers.2.self_attn.k_proj.weight", "model.layers.2.mlp.down_proj.weight"]
    # a full module name is an entry too (the exported adapter_config lists full names)
    assert select_targets(WEIGHTS, ["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize(("modules", "layers", "needle"), [
    (["q_projj"], None, "module 'q_projj' matches no linear module"),
    (None, [3], "layer 3 does not exist"),
])
def test_select_targets_errors_are_one_line(modules, layers, needle):
    with pytest.raises(ConfigError) as err:
        select_targets(WEIGHTS, modules, layers, key="space.twin.targets.x")
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("space.twin.targets.x: ")


def test_factors_only_on_chosen_modules_and_extra_params_exact(merger):
    from mergesearch.config import ObjectiveConfig
    from mergesearch.objectives import ObjectiveContext
    from mergesearch.objectives.cost import ExtraParams

    f = compute_factors(merger, 3, modules=["v_proj", "mlp.up_proj"], layers=[1])
    assert f.modules == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.v_proj"]  # checkpoint order
    # hidden 32, intermediate 64: v_proj 32x32, up_proj 64x32; 3 experts, rank 3
    assert f.num_params() == 3 * 3 * ((32 + 32) + (64 + 32))
    router = Router(32, 3, width=8)
    with RoutedModel(merger.model, f, router) as routed:
        static = sum(p.numel() for p in merger.model.parameters())
        want = 3 * 3 * (64 + 96) + (32 * 8 + 8 + 8 * 3 + 3) + 2 * 32  # factors + router weights + its 2·H buffers
        objective = ExtraParams(ObjectiveConfig(type="extra_params", name="extra"), ObjectiveContext())
        assert objective(routed, None) == pytest.approx(want / static, rel=1e-12)
        assert extra_params(f, router) + 2 * 32 == want
        # with expert 0's adapter only the targeted weights move: same logits as θ* with W + B·A there
        ids, mask, pos = batch(merger.tokenizer, ["<sort> 1 2 3 4 =", "<swap> 5 0 5 1 ="])
        with torch.no_grad():
            got = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=0).logits
    import copy

    twin = copy.deepcopy(merger.model)
    with torch.no_grad():
        for m in f.modules:
            twin.get_submodule(m).weight.add_(f.delta(0, m))
        want = twin(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_targets_select_nothing_is_an_error_before_any_svd(merger):
    with pytest.raises(ConfigError, match="module 'lm_head' matches no linear module of the decoder layers"):
        compute_factors(merger, 2, modules=["lm_head"])
    with pytest.raises(ConfigError, match="layer 5 does not exist"):
        compute_factors(merger, 2, layers=[5])


def test_peft_loads_targeted_adapter_and_merges_to_shared_plus_ba(merger, tmp_path):
    peft = pytest.importorskip("peft")
    import json

    from transformers import AutoModelForCausalLM

    from mergesearch.twin.io import export_twin, load_twin

    f = compute_factors(merger, 4, modules=["q_proj", "down_proj"], layers=[0])
    out = export_twin(tmp_path / "twin", merger.model, merger.tokenizer_path, f, None)
    shared = {k: v.clone() for k, v in merger.model.state_dict().items()}
    for t, name in enumerate(f.names):
        cfg = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == sorted(f.modules) == [
            "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapters" / name)
        lora = {n for n, _ in model.named_modules() if n.endswith(".lora_A")}
        assert len(lora) == 2  # PEFT adapted exactly the targeted modules, nothing else
        merged = model.merge_and_unload().state_dict()
        for key, value in shared.items():
            m = key.removesuffix(".weight")
            want = value + f.delta(t, m) if m in f.modules else value
            torch.testing.assert_close(merged[key], want, atol=1e-6, rtol=1e-6, msg=key)
    loaded = load_twin(out)
    assert loaded.factors.modules == f.modules or sorted(loaded.factors.modules) == sorted(f.modules)
    for m in f.modules:
        torch.testing.assert_close(loaded.factors.A[m], f.A[m])
        torch.testing.assert_close(loaded.factors.B[m], f.B[m])
    loaded.detach()


def test_space_searches_the_targets_as_a_choice(twin_models):
    from optuna.distributions import CategoricalDistribution

    from mergesearch.config import SpaceConfig
    from mergesearch.spaces import build_space

    def space(twin: dict):
        cfg = SpaceConfig.model_validate({"methods": ["task_arithmetic"], "weight": [0, 1], "twin": twin})
        return build_space(cfg, base_model=str(twin_models["base"]), num_layers=2, objectives=EXPERTS,
                           models=[str(twin_models[t]) for t in EXPERTS])

    one = space({"rank": 2})
    assert "twin.targets" not in one.distributions
    spec = one.candidate({})
    assert "modules" not in spec and "layers" not in spec and "distill" not in spec
    sp = space({"rank": [1, 3], "distill": {"steps": 7},
                "targets": {"all": {}, "attn0": {"modules": ["self_attn.q_proj", "o_proj"], "layers": [0]}}})
    assert sp.distributions["twin.targets"] == CategoricalDistribution(["all", "attn0"])
    assert sp.complete({})["twin.targets"] == "all"  # the first named set is the default
    spec = sp.candidate({"twin.targets": "attn0", "twin.rank": 3})
    assert spec["modules"] == ["self_attn.q_proj", "o_proj"] and spec["layers"] == [0] and spec["rank"] == 3
    assert spec["distill"]["steps"] == 7 and spec["distill"]["lr"] == pytest.approx(1e-2)
    assert sp.summary({"twin.targets": "attn0", "twin.rank": 3}).endswith("twin r=3 on attn0 distilled")
    assert sp.summary({"twin.targets": "all", "twin.rank": 1}).endswith("twin r=1 distilled")


@pytest.mark.parametrize(("twin", "needle"), [
    ({"rank": 2, "targets": {"x": {"modules": ["mlp.q_proj"]}}}, "space.twin.targets.x: module 'mlp.q_proj'"),
    ({"rank": 2, "targets": {"x": {"layers": [2]}}}, "space.twin.targets.x: layer 2 does not exist"),
    ({"rank": 2, "targets": {"x": {"modules": ["up_proj"], "layers": [1]}, "y": {"modules": ["nope"]}}},
     "space.twin.targets.y: module 'nope'"),
])
def test_space_refuses_targets_that_select_nothing(twin_models, twin, needle):
    from mergesearch.config import SpaceConfig
    from mergesearch.spaces import build_space

    cfg = SpaceConfig.model_validate({"methods": ["task_arithmetic"], "weight": [0, 1], "twin": twin})
    with pytest.raises(ConfigError) as err:
        build_space(cfg, base_model=str(twin_models["base"]), num_layers=2, objectives=EXPERTS,
                    models=[str(twin_models[t]) for t in EXPERTS])
    assert needle in str(err.value) and "\n" not in str(err.value)
