"""Variance-collapse correction: after correction each block's output has expert t's per-channel mean and std on
task t's prompts; a search over `space.correct` stores, exports, reloads and re-scores corrected candidates."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch

from mergesearch.candidates import CandidateContext, Corrected, load_model
from mergesearch.twin.correct import block_stats, decoder_layers
from tests.support.cli import run_cli as _cli
from tests.twin.conftest import EXPERTS, make_merger, prompts, shared_plan


class _Oracle:
    """A routed model called with a fixed task (oracle α), as block_stats calls a model."""

    def __init__(self, routed, task: int):
        self.shared, self.routed, self.task = routed.shared, routed, task

    def __call__(self, **kw):
        return self.routed(alpha=self.task, **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_corrected_blocks_match_each_experts_statistics(twin_models, dtype):
    merger = make_merger(twin_models, dtype)
    task_prompts = {t: prompts(t, 48, seed=i) for i, t in enumerate(EXPERTS)}
    ctx = CandidateContext(merger, merger.tokenizer, task_prompts.__getitem__)
    pairs = tuple((t, str(twin_models[t])) for t in EXPERTS)
    candidate = Corrected(shared_plan(twin_models, dtype), pairs, {"steps": 50})
    routed = candidate.build(ctx)
    try:
        layers = decoder_layers(routed.shared)
        tol = 1e-4 if dtype == "float32" else 3e-2
        collapse = []
        for t, (task, model) in enumerate(pairs):
            want_mean, want_std = ctx.cache[("expert_stats", model, task)]
            got_mean, got_std = block_stats(_Oracle(routed, t), merger.tokenizer, task_prompts[task], layers)
            torch.testing.assert_close(got_mean, want_mean, rtol=tol, atol=tol)
            torch.testing.assert_close(got_std, want_std, rtol=tol, atol=tol)
            _, raw_std = block_stats(routed.shared, merger.tokenizer, task_prompts[task], layers)
            collapse.append((raw_std / want_std).mean().item())
        assert min(collapse) < 0.995  # the uncorrected merge's statistics differ: the test can fail
    finally:
        candidate.release(routed)


TASKS = ("  - {type: exact_match, name: reverse, data: data/reverse_search.jsonl, test: data/reverse_test.jsonl}\n"
         "  - {type: loglik, name: sort_ll, data: data/sort_search.jsonl, test: data/sort_test.jsonl}\n"
         "  - {type: extra_params, name: extra}\n")




def test_corrected_study_exports_reloads_and_rescores(tiny_models, tmp_path: Path, capsys) -> None:
    from tests.conftest import write_job

    job = write_job(tmp_path, tiny_models, objectives=TASKS)
    job.write_text(job.read_text().replace("density: [0.2, 1]}", "density: [0.2, 1], correct: [none, variance]}"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    code, _, err = _cli(["run", str(job), "--storage", url, "--study", "c", "--trials", "4", "--no-progress"], capsys)
    assert code == 0, err
    trials = optuna.load_study(study_name="c", storage=url).trials
    families = {t.user_attrs["family"] for t in trials}
    assert "corrected" in families or len(trials) < 4, families
    corrected = [t for t in trials if t.user_attrs["family"] == "corrected"]
    if not corrected:
        pytest.skip("the sampler drew no corrected candidate")  # random sampler, seed 0: it does
    t = corrected[0]
    assert t.values[2] > 0  # the corrections and the router are extra numbers
    out = tmp_path / "corrected"
    code, _, err = _cli(["export", "--storage", url, "--study", "c", "--trial", str(t.number), "--out", str(out)],
                        capsys)
    assert code == 0, err
    assert (out / "corrections.safetensors").is_file() and load_model(out).corrections is not None
    scores = json.loads((out / "scores.json").read_text())
    code, text, err = _cli(["eval", str(job), "--model", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(text) == pytest.approx(scores["values"], rel=1e-5, abs=1e-5)


def test_correction_without_data_is_one_line(tiny_models, tmp_path: Path, capsys) -> None:
    from tests.conftest import write_job

    job = write_job(tmp_path, tiny_models, objectives="  - {type: l1_from_base, name: l1}\n")
    job.write_text(job.read_text().replace("density: [0.2, 1]}", "density: [0.2, 1], correct: [variance]}"))
    db = tmp_path / "n.db"
    code, _, err = _cli(["run", str(job), "--storage", f"sqlite:///{db}", "--study", "n", "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "task objective with data per model" in lines[0]
    assert not db.exists()
