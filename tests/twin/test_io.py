"""Export and load: the directory is a HF shared model + PEFT LoRA adapters + router, and round-trips exactly."""

from __future__ import annotations

import json

import pytest
import torch

from mergesearch.errors import ConfigError, ModelError
from mergesearch.twin.factors import compute_factors
from mergesearch.twin.io import export_twin, load_twin
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import RouterSettings, train_router
from tests.twin.conftest import EXPERTS, batch, make_merger, prompts

TEXTS = ["<reverse> 1 2 3 4 =", "<sort> 9 8 7 6 =", "<swap> 5 0 5 1 =", "<sort> 3 1 4 1 5 ="]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def exported(request, twin_models, merger, tmp_path_factory):
    """(routed model before export, export dir) at rank 8, with a router."""
    m = merger if request.param == "float32" else make_merger(twin_models, "bfloat16")
    router = train_router(m.model, m.tokenizer, [prompts(t, 24) for t in EXPERTS], RouterSettings(steps=60))
    routed = RoutedModel(m.model, compute_factors(m, 8), router)
    out = tmp_path_factory.mktemp("export") / "twin"
    export_twin(out, routed.shared, m.tokenizer_path, routed.factors, routed.router, {"plan": "task_arithmetic"})
    yield routed, out
    routed.detach()


def test_layout_is_hf_model_plus_peft_adapters(exported):
    routed, out = exported
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "router.safetensors", "router.json",
            "twin.json", "adapters"} <= set(names)
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.rglob("*"))  # safetensors only
    assert not [p for p in out.parent.iterdir() if p.name != "twin"]  # no temp dirs left behind
    info = json.loads((out / "twin.json").read_text())
    assert info["names"] == list(EXPERTS) and info["rank"] == 8 and info["meta"] == {"plan": "task_arithmetic"}
    cfg = json.loads((out / "adapters" / "swap" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(routed.factors.modules)


def test_export_load_same_logits(exported):
    routed, out = exported
    loaded = load_twin(out)
    assert loaded.shared.dtype == routed.shared.dtype and loaded.names == routed.names
    from transformers import AutoTokenizer

    ids, mask, pos = batch(AutoTokenizer.from_pretrained(out), TEXTS, "left")
    with torch.no_grad():
        for alpha in (None, "sort"):
            want = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=alpha).logits
            got = loaded(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=alpha).logits
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loaded.route(ids, mask), routed.route(ids, mask), atol=1e-6, rtol=1e-6)
    loaded.detach()


def test_export_refuses_non_empty_dir_and_rank_zero(exported, merger, tmp_path):
    routed, out = exported
    with pytest.raises(ConfigError, match="not empty"):
        export_twin(out, routed.shared, out, routed.factors, routed.router)
    with pytest.raises(ConfigError, match="rank 0"):
        export_twin(tmp_path / "z", merger.model, out, compute_factors(merger, 0), None)


def test_load_errors_name_the_file(exported, tmp_path):
    import shutil

    _, out = exported
    with pytest.raises(ModelError, match=r"twin\.json"):
        load_twin(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "adapters" / "swap" / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"adapter_model\.safetensors: missing"):
        load_twin(broken)


@pytest.mark.parametrize("rank", [4, 32])
def test_each_adapter_loads_in_peft_and_merges_to_shared_plus_ba(twin_models, merger, tmp_path, rank):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    factors = compute_factors(merger, rank)
    out = export_twin(tmp_path / "twin", merger.model, merger.tokenizer_path, factors, None)
    shared = {k: v.clone() for k, v in merger.model.state_dict().items()}
    for t, name in enumerate(factors.names):
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapters" / name)
        merged = model.merge_and_unload().state_dict()
        covered = {f"{m}.weight": m for m in factors.modules}
        for key, value in shared.items():
            want = value + factors.delta(t, covered[key]) if key in covered else value
            torch.testing.assert_close(merged[key], want, atol=1e-6, rtol=1e-6, msg=key)
        if rank == 32:  # full rank: the PEFT-merged model is the expert itself
            expert = load_file(str(twin_models[name] / "model.safetensors"))
            for key in covered:
                torch.testing.assert_close(merged[key], expert[key], atol=1e-5, rtol=1e-5, msg=key)
