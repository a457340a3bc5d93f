"""Fixtures for the twin tests: a tiny random base and three experts that differ from it only in the linear
weights of the decoder layers (the part Twin-Merging factorises), so a full-rank twin must reproduce them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan
from tests.conftest import make_tiny_llama

EXPERTS = ("reverse", "swap", "sort")  # named like the demo's tasks; their tokens are in the tiny vocabulary


def make_expert(base: Path, path: Path, seed: int, noise: float = 0.05) -> Path:
    """The base plus Gaussian noise on every 2-D ``model.layers.*`` weight (embeddings, norms, head unchanged)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and p.ndim == 2:
                p.add_(noise * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def twin_models(tmp_path_factory) -> dict[str, Path]:
    """``{"base": dir, "reverse": dir, "swap": dir, "sort": dir}``: hidden 32, 2 layers, max rank 32."""
    root = tmp_path_factory.mktemp("twin")
    base = make_tiny_llama(root / "base", seed=0)
    return {"base": base, **{t: make_expert(base, root / t, seed=i + 1) for i, t in enumerate(EXPERTS)}}


def shared_plan(models: dict[str, Path], dtype: str = "float32") -> MergePlan:
    """θ*: task arithmetic, weight 0.4 per expert."""
    return MergePlan.model_validate({
        "merge_method": "task_arithmetic", "base_model": str(models["base"]), "dtype": dtype,
        "models": [{"model": str(models[t]), "parameters": {"weight": 0.4}} for t in EXPERTS]})


def make_merger(models: dict[str, Path], dtype: str = "float32") -> ResidentMerger:
    merger = ResidentMerger(str(models["base"]), [str(models[t]) for t in EXPERTS], dtype=dtype)
    merger.apply(shared_plan(models, dtype))
    return merger


@pytest.fixture(scope="session")
def merger(twin_models) -> ResidentMerger:
    """A float32 resident merger holding θ* (tests must not apply other plans to it)."""
    return make_merger(twin_models)


def prompts(task: str, n: int, seed: int = 0) -> list[str]:
    """``n`` distinct demo prompts of ``task`` (4 digits): its search split."""
    from mergesearch.demo.tasks import eval_splits

    return [r["prompt"] for r in eval_splits(task, seed=seed, length=4, n_search=n, n_test=0)[0]]


def batch(tokenizer, texts: list[str], side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) [B, L] of ``texts``, padded on ``side``."""
    from mergesearch.objectives.scoring import pad, pad_id

    ids = [tokenizer(t)["input_ids"] for t in texts]
    input_ids, mask, pos, _ = pad(ids, pad_id(tokenizer), side, torch.device("cpu"))
    return input_ids, mask, pos
