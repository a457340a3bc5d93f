"""The one-pass numba kernel gives the same bits as the chunked torch loop, for every keep rule and option."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import ops

METHODS = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "dare_ties_invdensity"]


def _merge(method, base, taus, per, shared, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(ops, "kernels_usable", lambda b, o: False)
    m = ops.get_method(method)
    group = ops.group_of("t", [base] + [base + t for t in taus], 0, seed=7)
    group.delta = lambda i: taus[i - 1]
    try:
        return m.merge(group, {**m.shared, **shared}, [{}] + [{**m.per_input, **p} for p in per])
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shared", [{}, {"lambda": 0.7, "normalize": True}, {"normalize": False}])
@pytest.mark.parametrize("weights", [(0.6, 1.3, 0.4), (0.5, -0.3, 0.9)])
def test_kernel_is_bit_identical_to_torch_loop(method, shared, weights, monkeypatch):
    torch.manual_seed(3)
    shape = (61, 29)  # 1769 elements: several blocks and a ragged last one
    base = torch.randn(shape)
    taus = [torch.randn(shape).round(decimals=1) * 0.1 for _ in range(3)]  # ties in |τ| at the thresholds
    densities = (0.35, 1.0, 0.0)  # a sparsified input, one kept whole, one dropped
    per = [{"weight": w, "density": d} for w, d in zip(weights, densities, strict=True)]
    got = _merge(method, base, taus, per, shared, True, monkeypatch)
    want = _merge(method, base, taus, per, shared, False, monkeypatch)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)  # the merge did something


def test_ties_closed_form_through_kernel():
    base = torch.zeros(2, 3)
    taus = [torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]]), torch.tensor([[-3.0, -1.0, 1.0], [0.5, 2.0, 1.0]])]
    assert ops.kernels_usable(base, base)
    m = ops.get_method("ties")
    group = ops.group_of("t", [base] + [base + t for t in taus], 0)
    per = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = m.merge(group, dict(m.shared), per)
    # sign of the sum: [-, -, +], [+, +, 0 -> +]; agreeing entries averaged by the count of agreeing inputs
    want = torch.tensor([[-3.0, -1.5, 2.0], [0.5, 2.0, 1.0]])
    assert torch.equal(got, want)


def test_non_contiguous_destination_takes_torch_path():
    base = torch.randn(8, 6)
    out = torch.empty(6, 8).t()
    assert not ops.kernels_usable(base, out)
    assert not ops.kernels_usable(base.double(), base.double())


def test_della_mask_kernel_equals_torch_mask_and_keeps_rank_probabilities():
    from mergesearch.merging import kernels
    from mergesearch.merging import sparsify as sp

    torch.manual_seed(0)
    tau = torch.randn(400, 500)
    draws, ranks = sp.uniform_draws(tau.shape, 3), sp.della_rank_norm(tau)
    masked, before, after = kernels.della_mask(tau, draws, ranks, 0.5 - 0.2, 2 * 0.2)
    mask = sp.della_mask(tau, 0.5, 0.2, draws, ranks)
    assert torch.equal(masked, tau * mask)
    assert before == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    assert after == pytest.approx(masked.abs().sum().item(), rel=1e-5)
    # keep probability runs from d − ε = 0.3 (smallest |τ| of a row) to d + ε = 0.7 (largest)
    assert mask[ranks < 0.1].float().mean().item() == pytest.approx(0.32, abs=0.015)
    assert mask[ranks > 0.9].float().mean().item() == pytest.approx(0.68, abs=0.015)
