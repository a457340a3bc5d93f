"""The compiled kernel: closed forms, the path choice, DELLA masks (bit identity with the torch path: see
test_conformance)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import ops
from mergesearch.merging.methods import get_method


def test_ties_closed_form_through_kernel():
    base = torch.zeros(2, 3)
    taus = [torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]]), torch.tensor([[-3.0, -1.0, 1.0], [0.5, 2.0, 1.0]])]
    assert ops._kernel_usable(base, base)
    m = get_method("ties")
    group = ops.group_of("t", [base] + [base + t for t in taus], 0)
    per = [{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    got = m.merge(group, {k: p.default for k, p in m.shared.items()}, per)
    # sign of the sum: [-, -, +], [+, +, 0 -> +]; agreeing entries averaged by the count of agreeing inputs
    want = torch.tensor([[-3.0, -1.5, 2.0], [0.5, 2.0, 1.0]])
    assert torch.equal(got, want)


def test_non_contiguous_destination_takes_torch_path():
    base = torch.randn(8, 6)
    out = torch.empty(6, 8).t()
    assert not ops._kernel_usable(base, out)
    assert not ops._kernel_usable(base.double(), base.double())
    assert ops._kernel_usable(base.half(), base.bfloat16())


def test_della_mask_kernel_equals_torch_mask_and_keeps_rank_probabilities():
    from mergesearch.merging import kernels
    from mergesearch.merging import sparsify as sp

    torch.manual_seed(0)
    tau = torch.randn(400, 500)
    draws, compact = sp.uniform_draws(tau.shape, 3), sp.della_ranks(tau)
    ranks = sp.rank_norm(compact)
    masked, before, after = kernels.della_mask(tau, draws, compact, 0.5 - 0.2, 2 * 0.2)
    mask = sp.della_mask(tau, 0.5, 0.2, draws, ranks)
    assert torch.equal(masked, tau * mask)
    assert before == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    assert after == pytest.approx(masked.abs().sum().item(), rel=1e-5)
    # keep probability runs from d − ε = 0.3 (smallest |τ| of a row) to d + ε = 0.7 (largest)
    assert mask[ranks < 0.1].float().mean().item() == pytest.approx(0.32, abs=0.015)
    assert mask[ranks > 0.9].float().mean().item() == pytest.approx(0.68, abs=0.015)
