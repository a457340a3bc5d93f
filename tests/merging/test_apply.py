"""merge_config writes a loadable HF dir; ResidentMerger.apply gives the same weights in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergesearch.errors import ConfigError
from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan, load_plan
from mergesearch.merging.run import merge_config, save_model_dir


def load_weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


def ties_plan(m: dict[str, Path], density: float = 0.5, method: str = "ties") -> dict:
    return {"merge_method": method, "base_model": str(m["base"]), "dtype": "float32", "random_seed": 3,
            "models": [{"model": str(m["a"]), "parameters": {"weight": [0.3, 1.0], "density": density}},
                       {"model": str(m["b"]), "parameters": {"weight": 0.5, "density": density}},
                       {"model": str(m["c"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                                         {"value": 0.7}], "density": 0.9}}]}


def franken_plan(m: dict[str, Path]) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(m["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(m["b"]), "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]}


@pytest.fixture(scope="module")
def merger(tiny_models):
    return ResidentMerger(str(tiny_models["base"]), [str(tiny_models[k]) for k in "abc"])


def write(tmp_path: Path, plan: dict, name: str = "cfg.yml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(plan))
    return p


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "linear", "della"])
def test_apply_equals_merge_config(tmp_path, tiny_models, merger, method):
    plan = ties_plan(tiny_models, method=method)
    if method == "della":
        plan["parameters"] = {"epsilon": 0.05}
    if method == "linear":  # like mergekit, a base_model would join the inputs and need a weight
        del plan["base_model"]
    out = merge_config(write(tmp_path, plan), tmp_path / "out")
    ref = load_weights(out)
    sd = merger.apply(MergePlan.model_validate(plan)).state_dict()
    for k, v in ref.items():
        assert torch.equal(sd[k], v), k


def test_merge_config_output_loads_and_carries_recipe(tmp_path, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = write(tmp_path, ties_plan(tiny_models))
    out = merge_config(cfg, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model(**tok(["1 2 3"], return_tensors="pt")).logits.isfinite().all()
    assert load_plan(out / "recipe.yaml") == load_plan(cfg)
    assert "random_seed" not in (out / "mergekit_config.yml").read_text()
    with pytest.raises(ConfigError, match="not empty"):
        merge_config(cfg, out)
    assert merge_config(cfg, out, overwrite=True) == out
    assert not list(tmp_path.glob(".out.*"))  # no temp or old dirs left behind


def test_failed_merge_leaves_no_output(tmp_path, tiny_models):
    plan = ties_plan(tiny_models)
    plan["models"][0]["parameters"]["density"] = 2.0
    with pytest.raises(ConfigError):
        merge_config(write(tmp_path, plan), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_repeated_apply_with_changing_density_equals_fresh(tiny_models, merger):
    final = None
    for d in (0.2, 0.8, 0.35):
        final = {k: v.clone() for k, v in merger.apply(MergePlan.model_validate(ties_plan(tiny_models, d)))
                 .state_dict().items()}
    fresh = ResidentMerger(str(tiny_models["base"]), [str(tiny_models[k]) for k in "abc"])
    sd = fresh.apply(MergePlan.model_validate(ties_plan(tiny_models, 0.35))).state_dict()
    assert all(torch.equal(sd[k], final[k]) for k in sd)


def test_frankenmerge_apply_changes_layers_and_generates(tmp_path, tiny_models, merger):
    from transformers import AutoModelForCausalLM

    plan = franken_plan(tiny_models)
    out = merge_config(write(tmp_path, plan), tmp_path / "out")
    ref = AutoModelForCausalLM.from_pretrained(out)
    assert ref.config.num_hidden_layers == 3
    model = merger.apply(MergePlan.model_validate(plan))
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    b = load_weights(tiny_models["b"])
    torch.testing.assert_close(model.state_dict()["model.layers.2.mlp.up_proj.weight"],
                               0.5 * b["model.layers.1.mlp.up_proj.weight"])
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False),
                       ref.generate(ids, max_new_tokens=3, do_sample=False))
    sd = merger.apply(MergePlan.model_validate(ties_plan(tiny_models))).state_dict()
    assert len(model.model.layers) == 2 and sum(k.startswith("model.layers.") for k in sd) == 2 * 9


def test_save_model_dir_round_trip(tmp_path, tiny_models, merger):
    from transformers import AutoModelForCausalLM

    plan = MergePlan.model_validate(ties_plan(tiny_models))
    model = merger.apply(plan)
    out = save_model_dir(model, tmp_path / "exp", tokenizer_source=merger.tokenizer_path, recipe=plan)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    assert (out / "tokenizer.json").is_file() and load_plan(out / "recipe.yaml") == plan


def test_apply_rejects_unknown_model(tiny_models, merger):
    plan = ties_plan(tiny_models)
    plan["models"][0]["model"] = "/nowhere/x"
    with pytest.raises(ConfigError, match="/nowhere/x"):
        merger.apply(MergePlan.model_validate(plan))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_jobs_side_by_side_give_one_threads_bits(tiny_models, merger, dtype, monkeypatch):
    """On 2 threads the tensor jobs run side by side, one thread each (the workers' names show it); the merged
    weights are those of one thread, for every sparsifier family."""
    import threading

    from mergesearch.merging import apply

    names: set[str] = set()
    real = apply.run_job

    def spy(*args, **kwargs):
        names.add(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(apply, "run_job", spy)
    m = merger if dtype == "float32" else ResidentMerger(str(tiny_models["base"]),
                                                         [str(tiny_models[k]) for k in "abc"], dtype=dtype)
    old = torch.get_num_threads()
    try:
        for method in ("ties", "dare_ties", "della"):
            plan = ties_plan(tiny_models, method=method)
            plan["dtype"] = dtype
            if method == "della":
                plan["parameters"] = {"epsilon": 0.05}
            results = {}
            for threads in (1, 2):
                torch.set_num_threads(threads)
                names.clear()
                sd = m.apply(MergePlan.model_validate(plan)).state_dict()
                results[threads] = {k: v.clone() for k, v in sd.items()}
                assert any(n.startswith("mergesearch-kernel") for n in names) == (threads == 2), names
            assert all(torch.equal(results[1][k], results[2][k]) for k in results[1]), method
    finally:
        torch.set_num_threads(old)


def test_jobs_side_by_side_report_the_first_failing_tensor_in_plan_order(tiny_models, merger):
    from mergesearch.errors import NonFiniteError
    from mergesearch.merging.resolve import resolve

    plan = ties_plan(tiny_models)
    plan["parameters"] = {"normalize": False, "lambda": 1e4}  # overflows float32 where the weight is 1e38
    plan["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 1e38}, {"value": 0.5}]
    parsed = MergePlan.model_validate(plan)
    first = next(j.name for j in resolve(parsed, merger.checkpoints, merger.base).jobs if "mlp" in j.name)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(NonFiniteError, match=rf"{first!r}".replace(".", r"\.")):
            merger.apply(parsed)
    finally:
        torch.set_num_threads(old)
