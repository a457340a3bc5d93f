"""Exclusive factors: exact at full rank, best rank-r at lower rank, clear errors for impossible ranks."""

from __future__ import annotations

import re
import time

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.twin import factors as fmod
from mergesearch.twin.factors import compute_factors, extra_param_ratio, extra_params, truncated_svd
from tests.twin.conftest import EXPERTS


def test_full_rank_factors_are_the_exact_differences(merger):
    start = time.perf_counter()
    f = compute_factors(merger, 32)
    print(f"\nfactors at full rank: {time.perf_counter() - start:.3f}s for {len(f.modules)} tensors x 3 experts")
    assert f.names == EXPERTS and len(f.modules) == 14  # q k v o gate up down x 2 layers
    for t, expert in enumerate(f.experts):
        for m in f.modules:
            name = f"{m}.weight"
            want = merger.base_state[name] + merger.delta(expert, name) - merger.model.get_parameter(name)
            torch.testing.assert_close(f.delta(t, m), want, atol=2e-6, rtol=0)
            assert f.A[m].dtype == f.B[m].dtype == torch.float32


def test_low_rank_is_the_best_rank_r_approximation(merger):
    f = compute_factors(merger, 4)
    m = "model.layers.1.mlp.down_proj"
    name = f"{m}.weight"
    d = merger.base_state[name] + merger.delta(f.experts[1], name) - merger.model.get_parameter(name)
    s = torch.linalg.svdvals(d)
    # Eckart–Young: the truncation error of the best rank-4 approximation is the tail of the spectrum
    err = torch.linalg.matrix_norm(d - f.delta(1, m))
    assert err == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)
    assert f.A[m].shape == (3, 4, 64) and f.B[m].shape == (3, 32, 4)


def test_randomized_svd_path_matches_exact(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    # a decaying spectrum like a real task-vector difference: rank-6 signal plus small noise
    d = torch.randn(200, 6, generator=gen) @ torch.randn(6, 150, generator=gen) \
        + 0.01 * torch.randn(200, 150, generator=gen)
    b_exact, a_exact = truncated_svd(d, 4, "t")
    monkeypatch.setattr(fmod, "EXACT_SVD_MAX_NUMEL", 0)
    b, a = truncated_svd(d, 4, "t", seed=1)
    torch.testing.assert_close(b @ a, b_exact @ a_exact, atol=1e-3, rtol=1e-3)
    b2, a2 = truncated_svd(d, 4, "t", seed=1)
    assert torch.equal(b, b2) and torch.equal(a, a2)  # seeded: same result


def test_rank_too_large_names_tensor_and_max_rank(merger):
    with pytest.raises(ConfigError) as err:
        compute_factors(merger, 33)
    msg = str(err.value)
    assert "\n" not in msg
    assert re.search(r"tensor 'model\.layers\.\d+\.\w+\.\w+\.weight' \(\d+, \d+\)", msg), msg
    assert "max rank 32" in msg and "rank 33" in msg
    with pytest.raises(ConfigError, match="≥ 0"):
        compute_factors(merger, -1)
    with pytest.raises(ConfigError, match="not loaded"):
        compute_factors(merger, 2, experts=["nope"])


def test_extra_params_count_factors_and_router(merger):
    from mergesearch.twin.router import Router

    f = compute_factors(merger, 2)
    per_expert = sum(2 * (w.shape[0] + w.shape[1]) for n, w in merger.model.named_parameters()
                     if n.startswith("model.layers.") and w.ndim == 2)
    assert f.num_params() == extra_params(f) == 3 * per_expert
    router = Router(32, 3, width=8)
    assert extra_params(f, router) == 3 * per_expert + (32 * 8 + 8) + (8 * 3 + 3)
    total = sum(p.numel() for p in merger.model.parameters())
    assert extra_param_ratio(f, router, merger.model) == pytest.approx(extra_params(f, router) / total)
