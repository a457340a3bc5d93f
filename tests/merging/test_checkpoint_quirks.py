"""Checkpoints as they come from the hub: integer/bool buffers, tensors the architecture no longer has, and a tied
expert beside an untied base — merged by ``merge_config`` and by the resident merger alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergesearch.merging.apply import ResidentMerger, task_vectors
from mergesearch.merging.plan import MergePlan
from mergesearch.merging.run import merge_config
from mergesearch.models import Checkpoint

IDS, MASK, INV_FREQ = "model.extra_ids", "model.extra_mask", "model.layers.0.self_attn.rotary_emb.inv_freq"
UP = "model.layers.1.mlp.up_proj.weight"


def _add_tensors(d: Path, i: int) -> None:
    sd = load_file(str(d / "model.safetensors"))
    sd[IDS] = torch.arange(2**24 + 1, 2**24 + 40, dtype=torch.int64) + i  # float32 would round these
    sd[MASK] = torch.rand(6, 6, generator=torch.Generator().manual_seed(i)) > 0.5
    for layer in range(2):  # older Llama checkpoints store it; today's attention module has no such buffer
        sd[INV_FREQ.replace(".0.", f".{layer}.")] = torch.arange(4.0) + i
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def quirky(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """base, a, b of ``tiny_models`` with an int64 and a bool buffer and an old per-layer inv_freq added (each
    model's values differ, so the one copied can be told)."""
    root = tmp_path_factory.mktemp("quirky")
    out = {}
    for i, k in enumerate(("base", "a", "b")):
        out[k] = Path(shutil.copytree(tiny_models[k], root / k))
        _add_tensors(out[k], i)
    return out


def _plan(m: dict[str, Path], method: str, dtype: str) -> dict:
    plan = {"merge_method": method, "base_model": str(m["base"]), "dtype": dtype, "random_seed": 1,
            "parameters": {"t": 0.3},
            "models": [{"model": str(m["a"]), "parameters": {"weight": 0.7, "density": 0.5}},
                       {"model": str(m["b"]), "parameters": {"weight": 0.4, "density": 0.5}}]}
    if method == "slerp":
        plan["models"] = plan["models"][:1]
    if method in ("linear", "karcher"):  # no base among the inputs: the first source's buffers are kept
        del plan["base_model"]
    return plan


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", ["linear", "slerp", "karcher", "task_arithmetic", "ties", "dare_ties",
                                    "model_stock"])
def test_integer_and_bool_buffers_are_copied_never_merged(tmp_path, quirky, method, dtype):
    plan = _plan(quirky, method, dtype)
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(plan))
    out = load_file(str(merge_config(tmp_path / "cfg.yml", tmp_path / "out") / "model.safetensors"))
    src = load_file(str(quirky["a" if "base_model" not in plan else "base"] / "model.safetensors"))
    for name in (IDS, MASK):
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name]), name
    assert out[UP].dtype == getattr(torch, dtype) and torch.isfinite(out[UP].float()).all()


def test_resident_merger_skips_tensors_the_model_has_no_place_for(tmp_path, quirky):
    """A checkpoint tensor ``from_pretrained`` ignored (a per-layer inv_freq) used to stop every apply with an
    AttributeError; now it is merged by merge_config and left out by the resident model, whose weights match."""
    plan = _plan(quirky, "ties", "float32")
    merger = ResidentMerger(str(quirky["base"]), [str(quirky["a"]), str(quirky["b"])])
    sd = merger.apply(MergePlan.model_validate(plan)).state_dict()
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(plan))
    ref = load_file(str(merge_config(tmp_path / "cfg.yml", tmp_path / "out") / "model.safetensors"))
    assert INV_FREQ not in sd and INV_FREQ in ref
    shared = [k for k in sd if k in ref]
    assert UP in shared and len(shared) == len(sd)
    for k in shared:
        assert torch.equal(sd[k], ref[k]), k


def test_task_vectors_skip_integer_buffers(quirky):
    base, a = Checkpoint(str(quirky["base"])), Checkpoint(str(quirky["a"]))
    assert base.integer == {IDS, MASK}
    tv = task_vectors(base, a, torch.bfloat16)
    assert IDS not in tv and MASK not in tv
    assert torch.equal(tv[UP], a.get(UP, torch.bfloat16) - base.get(UP, torch.bfloat16))


@pytest.fixture(scope="module")
def tied_expert(tiny_models, tmp_path_factory) -> Path:
    """Expert ``a`` saved with tied embeddings: no lm_head.weight; its embedding stands for it."""
    d = Path(shutil.copytree(tiny_models["a"], tmp_path_factory.mktemp("tied") / "a"))
    sd = load_file(str(d / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    return d


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tied_expert_with_an_untied_base_uses_its_embedding_as_lm_head(tmp_path, tiny_models, tied_expert, dtype):
    base = str(tiny_models["base"])
    plan = {"merge_method": "task_arithmetic", "base_model": base, "dtype": dtype,
            "models": [{"model": str(tied_expert), "parameters": {"weight": 0.5}}]}
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(plan))
    out = load_file(str(merge_config(tmp_path / "cfg.yml", tmp_path / "out") / "model.safetensors"))
    b, e = Checkpoint(base), Checkpoint(str(tied_expert))
    work = getattr(torch, dtype)
    head0, embed = b.get("lm_head.weight", work), e.get("model.embed_tokens.weight", work)
    want = (head0.float() + 0.5 * (embed - head0).float()).to(work)
    assert torch.equal(out["lm_head.weight"], want)
    merger = ResidentMerger(base, [str(tied_expert)], dtype=dtype)
    assert torch.equal(merger.apply(MergePlan.model_validate(plan)).state_dict()["lm_head.weight"], want)
