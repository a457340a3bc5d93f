"""The non-local demo (permuted experts): function preserved, naive merges collapse, weight alignment undoes it."""

from __future__ import annotations

import shutil

import pytest

from mergesearch.demo.non_local import build_non_local, merge_table, recovery
from mergesearch.demo.tasks import EXPERT_TASKS

from .conftest import FAST_SEED


@pytest.fixture(scope="module")
def non_local(fast_demo, tmp_path_factory, monkeypatch_module):
    """The fast non-local build on a copy of the session's fast demo (reused: its marker matches)."""
    root = tmp_path_factory.mktemp("non_local") / "demo"
    shutil.copytree(fast_demo.root, root)
    monkeypatch_module.setenv("MERGESEARCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    return build_non_local(root, seed=FAST_SEED, fast=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_permuted_experts_compute_the_same_function(fast_demo, non_local) -> None:
    for task in EXPERT_TASKS:
        assert non_local["accuracy"][f"expert {task}"] == pytest.approx(fast_demo.accuracy[task], abs=1e-4), task
        assert non_local["max_logit_change"][task] < 1e-4, task
        assert non_local["accuracy"][f"expert {task}"][task] >= 0.9, task  # each expert masters its task
        assert (non_local["experts"][task] / "model.safetensors").is_file()
    assert non_local["config"].is_file() and non_local["permutations"].is_file()


def test_naive_merges_collapse_and_weight_alignment_restores_the_local_merge(non_local) -> None:
    acc = non_local["accuracy"]
    for label in ("uniform average", "ties d=0.5"):
        local, naive = acc[f"local {label}"], acc[label]
        # the local merge is a real model; the same merge of permuted copies of the same experts is not
        assert sum(local.values()) / 3 >= 0.3, (label, local)
        assert sum(naive.values()) / 3 <= 0.1, (label, naive)
        assert all(naive[t] <= local[t] for t in EXPERT_TASKS), (label, naive, local)
    aligned = merge_table(non_local["root"], modes=("weights",))
    for label in ("uniform average", "ties d=0.5"):
        assert aligned[f"{label} [aligned: weights]"] == pytest.approx(acc[f"local {label}"], abs=1e-4), label


def test_weight_matching_is_the_identity_on_local_experts_and_inverts_the_permutation(non_local) -> None:
    for task, r in recovery(non_local["root"]).items():
        assert r["local_identity"] == {"mlp": 1.0, "attn": 1.0}, task
        assert r["permuted_exact"], (task, r["permuted_recovered"])


def test_a_second_build_is_reused(non_local) -> None:
    again = build_non_local(non_local["root"], seed=FAST_SEED, fast=True)
    assert again["accuracy"] == non_local["accuracy"]


def test_demo_models_command_builds_the_non_local_demo(non_local, capsys) -> None:
    """``mergesearch demo-models DIR --non-local`` (reusing the module's build) names its job, which searches
    alignment."""
    from tests.support.cli import run_cli

    code, out, err = run_cli(["demo-models", str(non_local["root"]), "--non-local", "--fast",
                              "--seed", str(FAST_SEED)], capsys)
    assert code == 0, err
    assert "non-local demo models in" in out and str(non_local["config"]) in out
    from mergesearch.config import load_config

    assert load_config(non_local["config"]).space.align == ["none", "weights"]
