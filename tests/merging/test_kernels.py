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
    dropped, *norms = kernels.della_mask(tau, draws, compact, 0.5 - 0.2, 2 * 0.2, into="dropped")
    assert dropped.dtype == torch.int8 and torch.equal(dropped, (~mask).to(torch.int8).reshape(-1))
    assert norms == [before, after]
    assert before == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    assert after == pytest.approx(masked.abs().sum().item(), rel=1e-5)
    # keep probability runs from d − ε = 0.3 (smallest |τ| of a row) to d + ε = 0.7 (largest)
    assert mask[ranks < 0.1].float().mean().item() == pytest.approx(0.32, abs=0.015)
    assert mask[ranks > 0.9].float().mean().item() == pytest.approx(0.68, abs=0.015)


HALVES = [torch.bfloat16, torch.float16]


def _converters():
    import numba

    from mergesearch.merging import kernels

    @numba.njit
    def up(a, out):
        for j in range(a.shape[0]):
            out[j] = kernels._get(a, j)

    @numba.njit
    def down(x, d, bad):
        for j in range(x.shape[0]):
            kernels._put(d, j, x[j])
            probe = kernels._nan_probe(d[j:j + 1], 1)  # the merge's finiteness probe, on the rounded entry
            bad[j] = probe != probe

    return kernels, up, down


@pytest.mark.parametrize("dtype", HALVES)
def test_kernel_reads_every_half_precision_pattern_exactly(dtype):
    kernels, up, _ = _converters()
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)  # subnormals, ±inf, NaNs
    got = torch.empty(every.numel(), dtype=torch.float32)
    up(kernels._array(every), got.numpy())
    want = every.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bit for bit, -0.0 included


@pytest.mark.parametrize("dtype", HALVES)
def test_kernel_rounds_float32_to_half_precision_as_torch_does(dtype):
    kernels, _, down = _converters()
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(-2**31, 2**31, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = patterns.view(torch.float32)  # every class of float32: subnormal, huge, ±inf, NaN
    # the halfway points between neighbouring half-precision values: round-to-nearest-even decides each
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    h = h[torch.isfinite(h)].sort().values
    mids = ((h[1:].double() + h[:-1].double()) / 2).float()
    x = torch.cat([x, mids, torch.tensor([65504.0, 65520.0, 3.4e38, -3.4e38, 1e-45, 0.0, -0.0])])
    got = torch.empty(x.numel(), dtype=dtype)
    bad = torch.empty(x.numel(), dtype=torch.bool)
    down(x.numpy(), kernels._array(got), bad.numpy())
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert torch.equal(bad, ~torch.isfinite(want))


@pytest.mark.parametrize(("base_dtype", "out_dtype"), [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                                                     (torch.float32, torch.float16)])
def test_kernel_reads_and_writes_any_mix_of_dtypes_rounding_once(base_dtype, out_dtype):
    from mergesearch.merging import kernels

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(50_000, generator=gen).to(base_dtype)
    taus = [(torch.randn(50_000, generator=gen) * 0.01).to(torch.float16) for _ in range(3)]
    out = torch.empty(50_000, dtype=out_dtype)
    bad = kernels.fused_merge(base, out, taus, [0.5, 0.3, 0.2], [1.0] * 3, 1.0, False, False, 1.0)
    u = [c * t.float() for c, t in zip([0.5, 0.3, 0.2], taus, strict=True)]
    want = (base.float() + (0.0 + u[0] + u[1] + u[2])).to(out_dtype)  # float32 throughout, one rounding
    assert bad == 0
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("consensus", [False, True])
def test_keep_all_rule_equals_the_open_band(dtype, consensus):
    """Task arithmetic passes no band (the loop without a keep test): the same bits as an open band [-inf, inf],
    NaN and inf inputs included, under both the plain sum and the sign election."""
    from mergesearch.merging import kernels

    torch.manual_seed(1)
    n = 3 * kernels.BLOCK + 5  # a partial last block
    base = torch.randn(n).to(dtype)
    taus = [torch.randn(n).to(dtype) for _ in range(3)]
    taus[0][7], taus[1][8], taus[2][9] = float("nan"), float("inf"), -float("inf")
    rules = dict(coef=[0.5, 0.3, 0.2], weights=[0.5, 0.3, 0.2], lam=0.7, normalize=consensus, consensus=consensus,
                 div_nc=1.0)
    open_band, keep_all = torch.empty_like(base), torch.empty_like(base)
    bad_band = kernels.fused_merge(base, open_band, taus, lo=[-float("inf")] * 3, hi=[float("inf")] * 3, **rules)
    bad_all = kernels.fused_merge(base, keep_all, taus, **rules)
    assert torch.equal(open_band.view(torch.uint8), keep_all.view(torch.uint8))
    assert bad_all == bad_band == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int16,
                                   torch.uint16, torch.int32])
def test_kernel_arrays_share_the_tensors_memory_and_refuse_other_layouts(dtype):
    from mergesearch.merging import kernels

    t = torch.arange(12).reshape(3, 4).to(dtype)
    a = kernels._array(t)
    assert a.shape == (12,) and a.itemsize == t.element_size()
    assert a.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()  # the same bits, flat
    a[0] = a[5]
    assert torch.equal(t.reshape(-1)[0], t.reshape(-1)[5])  # written through: one memory
    del t
    assert a.tobytes()  # the array keeps the tensor's memory alive
    with pytest.raises(ValueError, match="contiguous CPU"):
        kernels._array(torch.zeros(3, 4, dtype=dtype).t())
