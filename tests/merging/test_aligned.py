"""Aligned experts as checkpoints (space.align): computed once and cached, recover a permuted expert exactly,
change nothing for experts fine-tuned from the base, and are what a space's plans name when chosen."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesearch.merging import align
from mergesearch.merging.aligned import aligned_path, ensure_aligned


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MERGESEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def close_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama, an expert fine-tuned a little from it, and that expert with its units permuted."""
    import json

    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("align")
    base = make_tiny_llama(root / "base", 0)
    expert = make_tiny_llama(root / "expert", 1, base=base, noise=0.002)
    cfg = json.loads((expert / "config.json").read_text())
    perm = align.ModelPermutation.random(cfg, torch.Generator().manual_seed(5))
    permuted = root / "permuted"
    shutil.copytree(expert, permuted)
    state = load_file(expert / "model.safetensors")
    save_file({k: v.contiguous() for k, v in align.apply_permutation(state, cfg, perm).items()},
              str(permuted / "model.safetensors"), metadata={"format": "pt"})
    return {"base": base, "expert": expert, "permuted": permuted}


def test_permuted_expert_is_recovered_exactly_and_cached(close_models):
    m = close_models
    out = ensure_aligned(str(m["base"]), str(m["permuted"]), "weights")
    assert out == aligned_path(str(m["base"]), str(m["permuted"]), "weights")
    got, want = load_file(out / "model.safetensors"), load_file(m["expert"] / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (out / "tokenizer.json").is_file() and (out / "aligned.json").is_file()
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_aligned(str(m["base"]), str(m["permuted"]), "weights") == out  # cached, not recomputed
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_expert_fine_tuned_from_the_base_is_left_as_is(close_models):
    """The local regime: weight matching finds the identity, so alignment changes nothing."""
    out = ensure_aligned(str(close_models["base"]), str(close_models["expert"]), "weights")
    got, want = load_file(out / "model.safetensors"), load_file(close_models["expert"] / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_activation_matching_recovers_the_permutation(close_models):
    prompts = ["<reverse> 1 2 3 4 =", "<sort> 4 3 2 1 =", "<swap> 1 2 3 4 =", "<reverse> 9 8 7 6 ="] * 4
    out = ensure_aligned(str(close_models["base"]), str(close_models["permuted"]), "activations", prompts)
    got, want = load_file(out / "model.safetensors"), load_file(close_models["expert"] / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_space_align_choice_names_the_aligned_experts_and_merges_like_the_unpermuted(close_models, tmp_path):
    from mergesearch.config import SpaceConfig
    from mergesearch.merging import run as runmod
    from mergesearch.spaces import build_space

    m = close_models
    base, experts = str(m["base"]), [str(m["permuted"])]
    aligned = {"weights": [str(ensure_aligned(base, experts[0], "weights"))]}
    cfg = SpaceConfig.model_validate({"methods": ["task_arithmetic"], "align": ["none", "weights"]})
    sp = build_space(cfg, base_model=base, models=experts, num_layers=2, aligned=aligned)
    assert list(sp.distributions["align"].choices) == ["none", "weights"]
    plan = sp.decode({"align": "weights", "weight.0": 0.7})
    assert [x.model for x in plan.models] == aligned["weights"] and "align=weights" in sp.summary(
        {"align": "weights", "weight.0": 0.7})
    unaligned = sp.decode({"align": "none", "weight.0": 0.7})
    assert [x.model for x in unaligned.models] == experts
    reference = unaligned.model_copy(update={"models": [unaligned.models[0].model_copy(
        update={"model": str(m["expert"])})]})
    names, cks = runmod.open_models(plan)
    _, ours = runmod.merge_plan_tensors(plan, names, cks)
    names, cks = runmod.open_models(reference)
    _, ref = runmod.merge_plan_tensors(reference, names, cks)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_alignment_of_models_of_different_widths_is_one_line_and_stores_nothing(tiny_models, tmp_path, capsys):
    from mergesearch.cli import main
    from tests.conftest import make_tiny_llama, write_job

    wide = make_tiny_llama(tmp_path / "wide", 3, hidden=48)
    job = write_job(tmp_path, {**tiny_models, "b": wide})
    job.write_text(job.read_text().replace("density: [0.2, 1]}", "density: [0.2, 1], align: [weights]}"))
    db = tmp_path / "a.db"
    capsys.readouterr()  # the model builder's progress output
    with pytest.raises(SystemExit) as e:
        main(["run", str(job), "--storage", f"sqlite:///{db}", "--study", "a", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "different widths" in err[0] and "hidden_size" in err[0]
    assert not db.exists()
