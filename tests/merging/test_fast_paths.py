"""The fast paths (fused chunked loop, sorted-bits order, bracketed selection, DARE L1 tables) change nothing."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import sparsify as sp
from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_magnitude_order_equals_a_full_sort(dtype):
    torch.manual_seed(0)
    tau = torch.randn(300_001).round(decimals=2).to(dtype)  # ties and zeros, above the small-tensor limit
    tau[:5] = -0.0
    tau[5:9] = torch.tensor([1e-40, -3e-39, 1e30, 0.0]).to(dtype)  # subnormals (float32) and a huge entry
    ref = tau.float().abs().sort().values
    order = sp.MagnitudeOrder(tau)
    # compact: occupied keys only (at most 2^15), no copy of τ
    assert order.sorted is None and 0 < order.keys.numel() <= 1 << 15
    assert order.nbytes == order.keys.numel() * 6 < tau.numel()
    n = tau.numel()
    for r in (0, 1, 4, 5, 9, 150_000, 299_999, n - 1, 7, 123_456, n - int(0.3 * n), n - int(0.77 * n)):
        assert order.value(r, tau).item() == ref[r].item(), r
        assert sp.select_abs(tau, r).item() == ref[r].item(), r


def test_magnitude_keys_compiled_and_torch_paths_agree():
    torch.manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tau = (torch.randn(100_003) * 10.0 ** torch.randint(-30, 3, (100_003,))).to(dtype)
        tau[:3] = torch.tensor([-0.0, float("inf"), -float("inf")]).to(dtype)
        compiled = sp.magnitude_keys(tau)
        strided = torch.stack([tau, tau], dim=1)[:, 0]  # the same values, not contiguous: the torch path
        chunked = sp.magnitude_keys(strided)
        assert compiled.sum().item() == tau.numel()
        assert torch.equal(compiled, chunked), dtype


def test_small_tensor_order_is_a_full_sort():
    tau = torch.tensor([[0.3, -0.1], [0.2, -0.3]])
    order = sp.MagnitudeOrder(tau)
    assert order.sorted.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert order.value(2, tau).item() == pytest.approx(0.3)


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


def _old_rank_norm(tau: torch.Tensor) -> torch.Tensor:
    """DELLA's row ranks as computed before they were made compact: argsort of argsort of the whole tensor."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float()
    width = rows.shape[1] - 1
    return (ranks / width if width > 0 else torch.zeros_like(ranks)).reshape(tau.shape)


@pytest.mark.parametrize("shape", [(700, 2048), (3, 5, 7), (1000,), (6, 1), (70_000, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compact_della_ranks_equal_whole_tensor_ranks(shape, dtype):
    torch.manual_seed(2)
    tau = (torch.randn(shape) * 4).round().to(dtype)  # many tied magnitudes: their order must not change
    ranks = sp.della_ranks(tau)
    # uint16: 2 bytes an entry; (700, 2048) is ranked in several blocks of rows
    assert ranks.dtype == torch.uint16 and ranks.shape == tau.shape
    assert torch.equal(sp.rank_norm(ranks), _old_rank_norm(tau))
    assert torch.equal(sp.della_rank_norm(tau), _old_rank_norm(tau))


def test_della_ranks_of_rows_longer_than_uint16_are_int32():
    tau = torch.randn(1, 70_000)
    ranks = sp.della_ranks(tau)
    assert ranks.dtype == torch.int32 and int(ranks.max()) == 69_999
    assert torch.equal(sp.rank_norm(ranks), _old_rank_norm(tau))


def test_magnitude_order_split_over_threads_equals_one_thread():
    from mergesearch.merging import kernels

    torch.manual_seed(3)
    tau = torch.randn(2 * kernels.MIN_PARALLEL + 12_345) * 0.01  # large enough to be split
    ref = tau.abs().sort().values
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        order = sp.MagnitudeOrder(tau)
        assert torch.equal(order.ends, sp.MagnitudeOrder(tau[:, None].expand(-1, 2)[:, 0]).ends)  # torch path
        for r in (0, 77, tau.numel() // 2, tau.numel() - 5, tau.numel() - 1):
            assert order.value(r, tau).item() == ref[r].item(), r
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_compiled_l1_table_is_bit_identical_to_index_add(dtype):
    torch.manual_seed(4)
    tau = (torch.randn(200_003) * 0.01).to(dtype)
    draws = sp.uniform_draws(tau.shape, 9)
    ref = torch.zeros(65537, dtype=torch.float64)
    ref.index_add_(0, draws.reshape(-1).int().add_(32769), tau.reshape(-1).abs().double())
    ref.cumsum_(0)
    assert torch.equal(sp.l1_by_draw(tau, draws), ref)
    strided = torch.stack([tau, tau], dim=1)[:, 0]  # not contiguous: the torch path
    assert torch.equal(sp.l1_by_draw(strided, draws), ref)


@pytest.mark.parametrize("method", ["della", "della_linear", "ties", "dare_ties"])
def test_merges_on_two_threads_equal_one_thread(method):
    from mergesearch.merging import kernels
    from mergesearch.merging.methods import get_method
    from mergesearch.merging.ops import group_of

    torch.manual_seed(5)
    base = torch.randn(2 * kernels.MIN_PARALLEL + 1_001, 3)  # split over threads; DELLA's passes side by side
    tensors = [base, *(base + 0.01 * torch.randn_like(base) for _ in range(3))]
    m = get_method(method)
    shared = {name: p.default for name, p in m.shared.items()}
    defaults = {name: p.default for name, p in m.per_input.items() if name not in ("weight", "density")}
    per_input = [{"weight": 1.0}] + [{**defaults, "weight": w, "density": 0.4} for w in (0.5, 0.3, 0.9)]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(m.merge(group_of("w", tensors, base_index=0, seed=3), shared, per_input))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("threads", [1, 2])
def test_bracketed_selection_over_threads_with_non_finite_entries(threads):
    """The float32 bracket pass tests runs on the key's bits and gathers by value: ranks below the non-finite
    entries (sorted last) are exact on one thread and split over two, and a rank on NaN falls back (NaN)."""
    torch.manual_seed(2)
    tau = torch.randn(700_001)  # two parts of at least MIN_PARALLEL entries
    tau[[3, 400_000]] = torch.tensor([float("nan"), float("inf")])
    ref = tau.abs().sort().values  # NaN last, inf just below it
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        order = sp.MagnitudeOrder(tau)
        for r in (0, 350_000, 699_998, 699_999):
            assert order.value(r, tau).item() == ref[r].item(), r
        assert torch.isnan(order.value(700_000, tau))
        # the compiled pass itself answers (a None would be hidden by the torch fallback above)
        from mergesearch.merging import kernels

        j = int(torch.searchsorted(order.ends, 350_000, right=True))
        key, below = int(order.keys[j]), int(order.ends[j - 1])
        got = kernels.bracket_select(tau, 350_000 - below, sp._bits_f32(key << 16), sp._bits_f32(key << 16 | 0xFFFF),
                                     int(order.ends[j]) - below)
        assert got == ref[350_000].item()
    finally:
        torch.set_num_threads(old)
