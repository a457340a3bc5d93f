"""MergeSpace: distributions, decode to MergePlan, unit-cube round trips, presets, validation."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from pydantic import ValidationError

from mergesearch.config import SpaceConfig
from mergesearch.errors import ConfigError
from mergesearch.merging.methods import METHODS, REQUIRED
from mergesearch.merging.plan import ConditionalValue, MergePlan
from mergesearch.spaces import build_space

MODELS = ["/m/a", "/m/b", "/m/c"]


def space(num_layers: int = 4, models: list[str] | None = None, seed: int = 0, **cfg):
    return build_space(SpaceConfig.model_validate(cfg), base_model="/m/base", models=models or MODELS,
                       num_layers=num_layers, seed=seed)


def random_params(sp, rng: np.random.Generator) -> dict:
    return sp.from_unit(rng.random(len(sp.distributions)))


def resolve(value, layer: int, n: int, name: str = ""):
    """mergekit's reading of a parameter for layer ``layer`` of a slice of ``n`` layers (METHODS.md)."""
    if isinstance(value, list) and value and isinstance(value[0], ConditionalValue):
        value = next(c.value for c in value if c.filter in (None, "*") or c.filter in name)
    if isinstance(value, list):
        s = (layer / (n - 1) if n > 1 else 1.0) * (len(value) - 1)
        i = min(int(np.floor(s)), len(value) - 2) if len(value) > 1 else 0
        frac = s - i
        return value[i] if len(value) == 1 else (1 - frac) * value[i] + frac * value[i + 1]
    return value


# ---------------------------------------------------------------- distributions and granularity
def test_global_names_and_scalars():
    sp = space(methods=["ties"])
    assert list(sp.distributions) == [f"weight.{i}" for i in range(3)] + [f"density.{i}" for i in range(3)]
    p = random_params(sp, np.random.default_rng(0))
    plan = sp.decode(p)
    assert plan.merge_method == "ties" and plan.base_model == "/m/base" and plan.slices is None
    for i, m in enumerate(plan.models):
        assert m.model == MODELS[i]
        assert m.parameters == {"weight": p[f"weight.{i}"], "density": p[f"density.{i}"]}


@pytest.mark.parametrize(("granularity", "num_layers", "groups"),
                         [("per_layer", 5, [0, 1, 2, 3, 4]), (2, 5, [0, 0, 1, 1, 2]), (3, 7, [0, 0, 0, 1, 1, 1, 2]),
                          (10, 4, [0, 0, 0, 0])])
def test_layer_groups_resolve_exactly(granularity, num_layers, groups):
    sp = space(num_layers=num_layers, methods=["task_arithmetic"], granularity=granularity)
    n_groups = max(groups) + 1
    assert len(sp.distributions) == 3 * n_groups
    p = random_params(sp, np.random.default_rng(1))
    plan = sp.decode(p)
    for i, m in enumerate(plan.models):
        w = m.parameters["weight"]
        if n_groups == 1:
            assert w == p[f"weight.{i}.0"]
            continue
        assert isinstance(w, list) and len(w) == num_layers
        for j in range(num_layers):
            expected = p[f"weight.{i}.{groups[j]}"]
            assert w[j] == expected
            # mergekit's gradient interpolation lands on the same value for every layer
            assert resolve(w, j, num_layers) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_filters_give_conditional_lists_with_catch_all_last():
    sp = space(methods=["ties"], granularity="per_layer", num_layers=2, filters=["self_attn", "mlp"])
    assert "weight.1.0.self_attn" in sp.distributions and "density.2.1.rest" in sp.distributions
    p = random_params(sp, np.random.default_rng(2))
    w = sp.decode(p).models[1].parameters["weight"]
    assert [c.filter for c in w] == ["self_attn", "mlp", None]
    assert w[0].value == [p["weight.1.0.self_attn"], p["weight.1.1.self_attn"]]
    assert w[2].value == [p["weight.1.0.rest"], p["weight.1.1.rest"]]
    name = "model.layers.1.mlp.up_proj.weight"
    assert resolve(w, 1, 2, name) == pytest.approx(p["weight.1.1.mlp"])
    assert resolve(w, 0, 2, "model.layers.0.input_layernorm.weight") == pytest.approx(p["weight.1.0.rest"])


# ---------------------------------------------------------------- methods read their own parameters
def _three_expert_methods() -> list[str]:
    """Methods that merge 3 experts (with the base when they use it), except slerp-like two-model ones."""
    return [n for n, m in METHODS.items() if n != "passthrough" and m.min_inputs <= 3 + (m.base != "unused") and
            (m.max_inputs is None or m.max_inputs >= 3 + (m.base != "unused"))]


def test_methods_pick_their_parameters():
    methods = _three_expert_methods()
    sp = space(methods=methods, **{"lambda": [0.5, 2]}, epsilon=[0.01, 0.2], t=[0, 1])
    assert "t" in sp.distributions or not any("t" in METHODS[m].shared for m in methods)
    p = random_params(sp, np.random.default_rng(3))
    for method in methods:
        info = METHODS[method]
        plan = sp.decode({**p, "method": method})
        assert plan.merge_method == method
        floats = [q for q in info.params if q.kind == "float"]
        keys = set(plan.models[0].parameters or {})
        # per model: the per-input parameters searched per model (weight, density) or required
        assert keys == {q.name for q in floats if q.per_input and q.search is not None}, method
        # plan level: the other searched parameters, and required shared ones
        assert set(plan.parameters or {}) == {q.name for q in floats if (q.name in sp.searched and q.search is None)
                                              or (not q.per_input and q.default is REQUIRED)}, method
        assert (plan.random_seed is not None) == info.random, method
        assert (plan.base_model is not None) == (info.base != "unused"), method
    plan = sp.decode({**p, "method": "linear"})
    assert plan.parameters is None and [m.model for m in plan.models] == MODELS


def test_unsearched_parameters_get_fixed_values():
    sp = space(methods=["ties", "task_arithmetic"], weight=None, density=None, **{"lambda": [0, 1]})
    assert list(sp.distributions) == ["method", "lambda"]
    plan = sp.decode({"method": "ties", "lambda": 0.3})
    assert plan.models[0].parameters == {"weight": 1.0}  # density not searched: mergekit default (1)
    assert plan.parameters == {"lambda": 0.3}


def test_slerp_plan():
    sp = space(models=["/m/a"], methods=["slerp"], t=[0, 1])
    plan = sp.decode({"t": 0.25})
    assert [m.model for m in plan.models] == ["/m/base", "/m/a"]
    assert plan.base_model == "/m/base" and plan.parameters == {"t": 0.25}
    assert plan.models[1].parameters is None


def test_della_epsilon_kept_inside_unit_interval():
    sp = space(methods=["della"], density=[0.0, 1.0], epsilon=[0.1, 0.4])
    rng = np.random.default_rng(4)
    for _ in range(50):
        plan = sp.decode(random_params(sp, rng))
        eps = plan.parameters["epsilon"]
        for m in plan.models:
            d = m.parameters["density"]
            assert d == 1.0 or 0 < d - eps < d + eps < 1


def test_seed_goes_to_random_methods():
    assert space(methods=["dare_ties"], seed=7).decode({}).random_seed == 7
    assert space(methods=["ties"], seed=7).decode({}).random_seed is None


# ---------------------------------------------------------------- round trips and determinism
def test_unit_round_trip_and_plan_round_trip():
    sp = space(num_layers=3, methods=["ties", "dare_ties", "task_arithmetic"], granularity="per_layer",
               filters=["self_attn"], **{"lambda": {"low": 0.1, "high": 2.0, "log": True}},
               layers={"choices": ["merged", "base", "b", "skip"], "depth_offset": 1, "min_layers": 2})
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = random_params(sp, rng)
        q = sp.from_unit(sp.to_unit(p))
        assert q.keys() == p.keys()
        for k, v in p.items():
            assert q[k] == (pytest.approx(v, rel=1e-9) if isinstance(v, float) else v), k
        plan = sp.decode(p)
        assert MergePlan.model_validate(plan.to_dict()) == plan
        assert sp.decode(dict(p)) == plan  # deterministic
    twin = space(num_layers=3, methods=["ties", "dare_ties", "task_arithmetic"], granularity="per_layer",
                 filters=["self_attn"], **{"lambda": {"low": 0.1, "high": 2.0, "log": True}},
                 layers={"choices": ["merged", "base", "b", "skip"], "depth_offset": 1, "min_layers": 2})
    assert list(twin.distributions.items()) == list(sp.distributions.items())
    assert twin.decode(p) == sp.decode(p)


def test_optuna_trial_sampling_decodes():
    sp = space(methods=["ties", "linear"], granularity=2, layers={"choices": ["merged", "skip"]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    p = sp.sample(trial)
    assert trial.distributions == sp.distributions
    assert sp.decode(p).merge_method in ("ties", "linear", "passthrough")


def test_complete_fills_and_checks():
    sp = space(methods=["ties"], **{"lambda": [0, 2]})
    full = sp.complete({"weight.0": 0.2})
    assert full["weight.0"] == 0.2 and full["weight.1"] == 1.0 and full["density.0"] == 1.0 and full["lambda"] == 1
    with pytest.raises(ConfigError, match=r"weight\.7"):
        sp.decode({"weight.7": 0.5})
    with pytest.raises(ConfigError, match=r"weight\.0=1\.5"):
        sp.decode({"weight.0": 1.5})


# ---------------------------------------------------------------- presets and summary
def test_presets_decode_to_intended_recipes():
    sp = space(methods=["task_arithmetic", "ties"], **{"lambda": [0, 2]})
    pre = sp.presets()
    assert set(pre) == {"uniform", "ties_default"}
    uni = sp.decode(pre["uniform"])
    assert uni.merge_method == "task_arithmetic" and uni.parameters == {"lambda": 1.0}
    assert [m.parameters["weight"] for m in uni.models] == pytest.approx([1 / 3] * 3)
    ties = sp.decode(pre["ties_default"])
    assert ties.merge_method == "ties"
    assert all(m.parameters == {"weight": 1.0, "density": 0.5} for m in ties.models)
    assert set(space(methods=["linear"]).presets()) == {"uniform"}
    assert space(methods=["linear"]).decode(space(methods=["linear"]).presets()["uniform"]).merge_method == "linear"


def test_source_paths_lay_each_model_out_once_in_depth_order():
    sp = space(num_layers=3, methods=["task_arithmetic"],
               layers={"slots": 6, "choices": ["merged", "base", "b", "skip"], "depth_offset": 1})
    paths = sp.source_paths()
    assert set(paths) == {"path:merged", "path:base", "path:b"} and set(paths) <= set(sp.presets())
    # model b is MODELS[1]: its own three layers in order, nothing shifted; the merge is the uniform recipe
    assert [sp.summary(paths[n]).split(" ")[-1] for n in paths] == ["layers=3:MMM---", "layers=3:bbb---",
                                                                    "layers=3:111---"]
    assert all(v == 0 for n in paths for k, v in paths[n].items() if k.startswith("layer_offset."))
    assert [paths["path:merged"][f"weight.{i}"] for i in range(3)] == pytest.approx([1 / 3] * 3)
    assert space(methods=["ties"]).source_paths() == {}  # no layers
    # more slots than layers and no skip: the network cannot be laid out once
    assert space(num_layers=2, layers={"slots": 4, "choices": ["merged", "base"]}).source_paths() == {}
    short = space(num_layers=2, layers={"slots": 6, "choices": ["merged", "base", "skip"], "min_layers": 3})
    assert short.summary(short.source_paths()["path:base"]).endswith("layers=3:bbM---")  # repaired to min


def test_presets_clamp_into_ranges():
    sp = space(methods=["ties"], density=[0.6, 0.9], weight=[0.0, 0.5])
    plan = sp.decode(sp.presets()["ties_default"])
    assert all(m.parameters == {"weight": 0.5, "density": 0.6} for m in plan.models)


def test_summary():
    sp = space(methods=["ties"], **{"lambda": [0, 2]})
    p = {"weight.0": 0.8, "weight.1": 0.4, "weight.2": 0.1, "density.0": 0.5, "density.1": 0.6,
         "density.2": 0.3, "lambda": 1.0}
    assert sp.summary(p) == "ties w=[.8,.4,.1] d=[.5,.6,.3] λ=1"


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(("cfg", "models", "match"), [
    ({"methods": ["tie"]}, MODELS, r"space\.methods: unknown method 'tie' \(known: .*task_arithmetic, ties"),
    ({"methods": ["slerp"], "t": [0, 1]}, MODELS,
     r"slerp merges exactly 2 models including the base, got 4 \(3 models \+ base\)"),
    ({"methods": ["model_stock"]}, MODELS, "nothing to search"),
    ({"methods": ["model_stock"], "t": [0, 1]}, ["/m/a"],
     "model_stock merges at least 3 models including the base, got 2"),
    ({"methods": ["linear"], "weight": None}, MODELS, "nothing to search"),
    ({"methods": ["ties", "ties"]}, MODELS, "'ties' listed twice"),
    ({"methods": ["passthrough"]}, MODELS, "passthrough only copies layers"),
    ({"methods": ["ties"], "density": [0.5, 1.5]}, MODELS, r"space\.density: must lie in \[0, 1\]"),
    ({"methods": ["slerp"], "t": [0, 2]}, ["/m/a"], r"space\.t: must lie in \[0, 1\]"),
    ({"filters": ["mlp", "rest"]}, MODELS, r"space\.filters: 'rest' is not a tensor-name filter"),
    ({"filters": ["mlp", "mlp"]}, MODELS, r"space\.filters: 'mlp' listed twice"),
    ({"layers": {"choices": ["merged", "zz"]}}, MODELS, "space.layers.choices: unknown choice 'zz'"),
    ({"layers": {"choices": ["skip"]}}, MODELS, "at least one choice other than 'skip'"),
    ({"layers": {"min_layers": 3, "max_layers": 2}}, MODELS, r"space\.layers\.min_layers: 3 > max_layers \(2\)"),
    ({"layers": {"min_layers": 5}}, MODELS, r"space\.layers\.min_layers: 5 > slots \(4\)"),
    ({"layers": {"choices": ["a", "0"]}}, MODELS, "two entries name the same model"),
])
def test_bad_spaces(cfg, models, match):
    with pytest.raises(ConfigError, match=match) as err:
        space(models=models, **cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("cfg", [{"granularity": 0}, {"granularity": -2}, {"weight": [1.0, 0.5]}])
def test_schema_rejects(cfg):
    with pytest.raises(ValidationError):
        SpaceConfig.model_validate(cfg)


def test_large_granularity_is_one_group():
    sp = space(num_layers=3, methods=["task_arithmetic"], granularity=8)
    assert list(sp.distributions) == ["weight.0.0", "weight.1.0", "weight.2.0"]
