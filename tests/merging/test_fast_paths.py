"""The fast paths (fused chunked loop, sorted-bits order, bracketed selection, DARE L1 tables) change nothing."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import sparsify as sp
from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan


def test_select_abs_and_sorted_bits_equal_float_sort():
    torch.manual_seed(0)
    tau = torch.randn(300_001).round(decimals=2)  # above the sampling threshold, with ties and zeros
    tau[:5] = -0.0
    ref = tau.abs().sort().values
    order = sp.MagnitudeOrder(tau)
    assert order.table.numel() == sp.QUANTILES + 1  # compact: not a copy of τ
    for r in (0, 1, 150_000, 299_999, 300_000, 7, 123_456, *order.ranks[100:103]):
        assert sp.select_abs(tau, r).item() == ref[r].item()
        assert order.value(r, tau).item() == ref[r].item()
    for dtype in (torch.bfloat16, torch.float16):  # the compiled bracket pass reads τ in its own dtype
        t = tau.to(dtype)
        ref_t = t.float().abs().sort().values
        order_t = sp.MagnitudeOrder(t)
        for r in (5, 77_777, 299_000):
            assert order_t.value(r, t).item() == ref_t[r].item()


def test_l1_table_equals_direct_sums():
    torch.manual_seed(0)
    tau = torch.randn(40, 30)
    draws = sp.uniform_draws(tau.shape, 11)
    table = sp.l1_by_draw(tau, draws)
    assert sp.keep_below(0.999999) > 32767  # keeps every draw (int16 would wrap around): no mask is built
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
