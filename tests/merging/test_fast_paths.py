"""The fast paths (fused chunked loop, sorted-bits order, bracketed selection, DARE L1 tables) change nothing."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import ops
from mergesearch.merging import sparsify as sp
from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan


def _reference_merge(base, taus, weights, masks, consensus, normalize):
    """Straight from METHODS.md: masked, weighted, sign-consensus mix (no chunking, no tricks)."""
    u = torch.stack([w * (t * m) for t, w, m in zip(taus, weights, masks, strict=True)])
    if not consensus:
        mixed = u.sum(0)
        return base + (mixed / sum(weights) if normalize else mixed)
    sign = torch.where(u.sum(0) >= 0, 1.0, -1.0)
    agree = (u * sign) > 0
    mixed = (u * agree).sum(0)
    if normalize:
        div = (torch.tensor(weights).view(-1, 1, 1) * agree).sum(0)
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return base + mixed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear_invdensity"])
def test_fused_loop_matches_reference_including_ties_at_threshold(method, dtype, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK", 1000)  # several chunks plus a ragged last one
    torch.manual_seed(1)
    base = torch.randn(70, 53, dtype=dtype)
    taus = [torch.randn(70, 53, dtype=dtype).round(decimals=1) for _ in range(3)]  # many exact ties in |τ|
    weights, density = [0.6, 1.3, 0.4], 0.35
    per = [{}] + [{"weight": w, "density": density, "gamma": 0.05} for w in weights]
    m = ops.get_method(method)
    group = ops.group_of("t", [base] + [base + t for t in taus], 0, seed=4)
    group.delta = lambda i: taus[i - 1]
    got = m.merge(group, {**m.shared}, per)
    flags = ops.TASK_VECTOR_METHODS[method]
    if flags.sparsifier == "magnitude":
        masks = [sp.magnitude_mask(t, density) for t in taus]
    elif flags.sparsifier == "magnitude_outliers":
        masks = [sp.outliers_mask(t, density, 0.05) for t in taus]
    else:
        masks = [sp.random_mask(t, density, 4 + i + 1) for i, t in enumerate(taus)]
        weights = [w / density for w in weights]
    want = _reference_merge(base, taus, weights, [mk.to(dtype) for mk in masks], flags.consensus,
                            m.shared["normalize"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_select_abs_and_sorted_bits_equal_float_sort():
    torch.manual_seed(0)
    tau = torch.randn(300_001).round(decimals=2)  # above the sampling threshold, with ties and zeros
    tau[:5] = -0.0
    ref = tau.abs().sort().values
    order = sp.MagnitudeOrder(tau)
    assert torch.equal(order.sorted, ref)
    for r in (0, 1, 150_000, 299_999, 300_000, 7, 123_456):
        assert sp.select_abs(tau, r).item() == ref[r].item()


def test_l1_table_equals_direct_sums():
    torch.manual_seed(0)
    tau = torch.randn(40, 30)
    draws = sp.uniform_draws(tau.shape, 11)
    table = sp.l1_by_draw(tau, draws)
    assert sp.random_mask(tau, 0.999999, 11) is None  # keep_below would wrap around in int16
    for d in (0.0, 0.1, 0.5, 0.93, 0.99999):
        kb = sp.keep_below(d)
        direct = tau.abs()[draws < kb].double().sum().item()
        assert table[kb + 32768].item() == pytest.approx(direct, rel=1e-12, abs=1e-12)
    assert table[-1].item() == pytest.approx(tau.abs().double().sum().item(), rel=1e-12)


def _plan(m, method: str, density: float) -> MergePlan:
    return MergePlan.model_validate({
        "merge_method": method, "base_model": str(m["base"]), "dtype": "float32", "random_seed": 7,
        "models": [{"model": str(m[k]), "parameters": {"weight": w, "density": density}}
                   for k, w in zip("abc", (0.5, 0.3, 0.9), strict=True)]})


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "breadcrumbs_ties", "ties"])
def test_warm_apply_after_density_changes_equals_fresh_merger(tiny_models, method):
    models = [str(tiny_models[k]) for k in "abc"]
    warm = ResidentMerger(str(tiny_models["base"]), models)
    for d in (0.9, 0.25, 0.6):
        final = {k: v.clone() for k, v in warm.apply(_plan(tiny_models, method, d)).state_dict().items()}
    fresh = ResidentMerger(str(tiny_models["base"]), models).apply(_plan(tiny_models, method, 0.6)).state_dict()
    assert all(torch.equal(fresh[k], final[k]) for k in fresh)
