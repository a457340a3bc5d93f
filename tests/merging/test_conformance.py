"""Conformance of every merge method × {float32, bfloat16, float16} × {cpu, cuda when present}.

For each: the result is finite, has the inputs' dtype, and equals a float64 run of the same method on the same
(upcast, hence identical) inputs within one unit in the last place of the dtype (computed in float32, rounded
once). The task-vector family also equals the independent float64 reference of ``reference.py``, and the compiled
kernel gives the same bits as the torch path in every dtype.
"""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import NonFiniteError
from mergesearch.merging import ops
from mergesearch.merging.methods import METHODS
from tests.merging.reference import params_for, reference_task_vector, run

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]
TASK_VECTOR = sorted(n for n, m in METHODS.items() if "flags" in m.options)


def _experts(method: str) -> int:
    """How many experts a method takes in these tests: 3 when it can, else its maximum."""
    m = METHODS[method]
    base = 1 if (m.needs_base or m.non_base) else 0
    return 3 if m.max_inputs is None or m.max_inputs - base >= 3 else m.max_inputs - base


def _inputs(shape=(61, 29), n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    taus = [torch.randn(shape, generator=g) * 0.05 for _ in range(n)]
    return base, taus


def _ulp_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float,
               ties: torch.Tensor | None = None) -> None:
    """|got − want| ≤ one ulp of the dtype at |want| (float32 work: a few ulp), plus cancellation slack.

    ``ties``: entries whose TIES sign election is a near tie (|Σ u| within float32 rounding of 0), where float32
    and float64 may elect different signs — a discontinuity of the method, not an error; they are skipped.
    """
    eps = torch.finfo(dtype).eps
    ulps = 8 if dtype == torch.float32 else 1
    tol = ulps * eps * want.abs() + 4 * torch.finfo(torch.float32).eps * scale
    if ties is not None:
        assert ties.double().mean().item() < 0.01  # a rare event, not a way around the check
        tol = torch.where(ties, float("inf"), tol)
    excess = ((got.double() - want).abs() - tol).max().item()
    assert excess <= 0, f"off by more than {ulps} ulp (+{excess:.3g})"


def _sign_ties(method, base, taus, per=None, per_list=None, shared=None, seed=7):
    if method not in TASK_VECTOR:
        return None
    sh, rows = params_for(method, len(taus), per, shared)
    for row, extra in zip(rows[1:], per_list or [], strict=False):
        row.update(extra)
    m = reference_task_vector(method, base, taus, sh, rows, seed, margin=True)
    # |Σ u| = 0 exactly where every input was dropped: no tie, both precisions agree there
    return (m > 0) & (m < 16 * torch.finfo(torch.float32).eps * sum(t.double().abs() for t in taus).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_finite_and_equal_to_float64(method, dtype, device):
    n = _experts(method)
    base, taus = _inputs(n=n)
    # the inputs as the dtype holds them; the float64 run sees the same values
    base, taus = base.to(dtype), [t.to(dtype) for t in taus]
    experts = [(base.double() + t.double()).to(dtype) for t in taus]
    per = {"density": 0.45}
    got = run(method, base, taus, per=per, dtype=dtype, device=device, experts=experts)
    assert got.dtype == dtype and got.device.type == device
    assert torch.isfinite(got).all()
    want = run(method, base.double(), [t.double() for t in taus], per=per, dtype=torch.float64,
               experts=[e.double() for e in experts])
    scale = base.abs().max().item() + sum(t.abs().max().item() for t in taus)
    _ulp_close(got.cpu(), want, dtype, scale, _sign_ties(method, base, taus, per))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", TASK_VECTOR)
@pytest.mark.parametrize("shared", [{}, {"lambda": 0.7, "normalize": True, "rescale": True}],
                         ids=["defaults", "lambda-normalize-rescale"])
def test_task_vector_family_equals_independent_reference(method, dtype, shared):
    base, taus = _inputs()
    base, taus = base.to(dtype), [t.to(dtype).double().round(decimals=2).to(dtype) for t in taus]  # |τ| ties
    densities = (0.35, 1.0, 0.0)  # a sparsified input, one kept whole, one dropped
    per = [{"density": d} for d in densities]
    got = run(method, base, taus, per_list=per, shared=shared, seed=5)
    sh, rows = params_for(method, 3, shared=shared)
    for row, d in zip(rows[1:], densities, strict=True):
        row["density"] = d
    want = reference_task_vector(method, base, taus, sh, rows, seed=5)
    margin = reference_task_vector(method, base, taus, sh, rows, seed=5, margin=True)
    ties = (margin > 0) & (margin < 1e-6)
    _ulp_close(got, want, dtype, base.abs().max().item() + sum(t.abs().max().item() for t in taus), ties)
    assert not torch.equal(got, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", TASK_VECTOR)
@pytest.mark.parametrize("weights", [(0.6, 1.3, 0.4), (0.5, -0.3, 0.9)])
@pytest.mark.parametrize("rescale", [None, False], ids=["default-rescale", "no-rescale"])
def test_kernel_is_bit_identical_to_torch_path(method, dtype, weights, rescale, monkeypatch):
    """Both kernel forms of DELLA's keep rule too: drop flags from the rescale pass (its default), and the draw
    test in the merge loop (without rescale)."""
    base, taus = _inputs(shape=(173, 61))  # several kernel blocks and a ragged last one
    monkeypatch.setattr(ops, "CHUNK", 4096)  # several torch chunks too
    per = [{"weight": w, "density": d} for w, d in zip(weights, (0.35, 1.0, 0.6), strict=True)]
    shared = {} if rescale is None else {"rescale": rescale}
    got = run(method, base, taus, per_list=per, shared=shared, dtype=dtype)
    monkeypatch.setattr(ops, "_kernel_usable", lambda b, o: False)
    want = run(method, base, taus, per_list=per, shared=shared, dtype=dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_kernel_is_bit_identical_to_torch_path(dtype, normalize, monkeypatch):
    base, taus = _inputs(shape=(173, 61))
    per = [{"weight": w} for w in (0.7, 0.2, -0.4, 1.3)]
    tensors = [t.to(dtype) for t in (base, *taus)]
    kw = {"per_list": per, "shared": {"normalize": normalize}, "dtype": dtype, "experts": tensors}
    got = run("linear", base, [base] * 4, **kw)
    monkeypatch.setattr(ops, "_kernel_usable", lambda b, o: False)
    want = run("linear", base, [base] * 4, **kw)
    assert torch.equal(got, want)
    div = sum(p["weight"] for p in per) if normalize else 1.0
    acc = torch.zeros(base.shape, dtype=torch.float64)
    for t, p in zip(tensors, per, strict=True):
        acc += t.double() * p["weight"]
    exact = acc / div
    if dtype == torch.float32:  # summed in float64, divided, rounded once
        assert torch.equal(got, exact.float())
        return
    # half precision: summed in float32 in input order, divided there, rounded once ...
    acc32 = torch.zeros(base.shape)
    for t, p in zip(tensors, per, strict=True):
        acc32 += t.float() * p["weight"]
    assert torch.equal(got, (acc32 / div).to(dtype))
    # ... which stays within one unit in the last place of the exact result
    _ulp_close(got, exact, dtype, scale=0.0)


PRECISE = ["slerp", "nearswap", "karcher", "sce", "nuslerp", "multislerp", "arcee_fusion", "ram", "ramplus_tl"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", PRECISE)
def test_methods_off_the_hot_path_are_the_float64_result_rounded_once(method, dtype):
    """Selections (top-k, quantiles, thresholds) and cancellations made float32 work land hundreds of ulps away
    at a few entries; these methods compute in float64 from exact inputs, so they are that result rounded."""
    n = _experts(method)
    base, taus = _inputs(n=n)
    base, taus = base.to(dtype), [t.to(dtype) for t in taus]
    experts = [(base.double() + t.double()).to(dtype) for t in taus]
    per = {"density": 0.45}
    got = run(method, base, taus, per=per, dtype=dtype, experts=experts)
    want = run(method, base.double(), [e.double() - base.double() for e in experts], per=per,
               dtype=torch.float64, experts=[e.double() for e in experts])
    assert torch.equal(got, want.to(dtype))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "linear"])
def test_a_nan_input_entry_is_refused_on_both_paths(method, kernel, monkeypatch):
    """A NaN in a task vector is never silently dropped (the kernel once masked it out where torch kept it)."""
    if not kernel:
        monkeypatch.setattr(ops, "_kernel_usable", lambda b, o: False)
    base, taus = _inputs(shape=(64, 64))
    taus[1] = taus[1].clone()
    taus[1][3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=method):
        run(method, base, taus, per={"density": 1.0})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della"])
def test_consensus_methods_finite_in_half_precision_regression(method, dtype):
    """The bug this suite exists for: the consensus clamp used float32's maximum, inf in half precision."""
    base, taus = _inputs(shape=(256, 64))
    base, taus = base.to(dtype), [t.to(dtype) for t in taus]
    got = run(method, base, taus, per={"density": 0.3}, dtype=dtype)
    assert torch.isfinite(got).all()
    # the float32 merge of the same (half-precision) inputs, rounded once: equal up to rounding and sign ties
    f32 = run(method, base.float(), [t.float() for t in taus], per={"density": 0.3}, dtype=torch.float32)
    scale = base.abs().max().item() + sum(t.abs().max().item() for t in taus)
    _ulp_close(got, f32.double(), dtype, scale, _sign_ties(method, base, taus, {"density": 0.3}))


def test_kernel_threads_give_the_same_bits(monkeypatch):
    from mergesearch.merging import kernels

    monkeypatch.setattr(kernels, "MIN_PARALLEL", 1 << 12)
    base, taus = _inputs(shape=(300, 200))
    one = run("ties", base, taus, per={"density": 0.4}, dtype=torch.bfloat16)
    prev = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = run("ties", base, taus, per={"density": 0.4}, dtype=torch.bfloat16)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, three)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch"])
def test_overflowing_merge_is_refused_naming_tensor_and_method(dtype, kernel, monkeypatch):
    if not kernel:
        monkeypatch.setattr(ops, "_kernel_usable", lambda b, o: False)
    base, taus = _inputs(shape=(8, 8))
    taus = [t * 20 for t in taus]  # |τ| ~ 1
    big = torch.finfo(dtype).max / 2
    with pytest.raises(NonFiniteError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*ties.*non-finite"):
        run("ties", base, taus, per_list=[{"weight": big}, {"weight": big}, {"weight": big}],
            shared={"normalize": False, "lambda": 4.0}, dtype=dtype)


@pytest.mark.parametrize("method", ["linear", "slerp", "model_stock"])
def test_other_operators_refuse_non_finite_results(method):
    base, taus = _inputs(shape=(4, 4), n=_experts(method))
    taus[0] = taus[0].clone()
    taus[0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=method):
        run(method, base, taus)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "della"])
def test_float64_inputs_keep_the_same_entries_as_float32(method):
    """The magnitude band is found on |τ| in float32; float64 entries were compared with it in float64, so an
    entry whose float32 rounding went up fell out (τ = 0.1 kept nothing at density 0.1: the bare base)."""
    per = {"density": 0.3, "gamma": 0.0, "epsilon": 0.05}
    for seed in range(8):
        base, taus = _inputs(shape=(97,), n=2, seed=seed)
        taus = [t.double() for t in taus]
        f64 = run(method, base.double(), taus, per=per) - base.double()
        f32 = run(method, base.double().float(), [t.float() for t in taus], per=per) - base.float()
        assert f64.dtype == torch.float64
        assert torch.equal(f64 != 0, f32 != 0)
    one = run("ties", torch.zeros(6, dtype=torch.float64), [torch.tensor([0.1, 0.01, -0.02, 0.03, 0.001, 0.002],
                                                                        dtype=torch.float64)],
              per={"density": 0.1}, per_list=[{"weight": 1.0}])
    assert one.tolist() == [0.1, 0, 0, 0, 0, 0]


def _merge(method: str, tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """``method`` over in-memory ``tensors`` (the base first, except for linear) with default parameters."""
    uses_base = method != "linear"
    group = ops.group_of("w", tensors, 0 if uses_base else None, seed=7)
    group.method, group.out = method, out
    sh, rows = params_for(method, len(tensors) - uses_base, base=uses_base)
    return METHODS[method].merge(group, sh, rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_strided_base_and_destination_give_the_contiguous_result(method, dtype):
    """A transposed base made the destination strided; the chunked pass wrote into a copy of it and returned
    uninitialised memory. Strided inputs or a strided ``out`` now give the contiguous inputs' bits."""
    base, taus = _inputs(shape=(29, 61), n=3)
    tensors = [t.to(dtype) for t in (base, *(base + t for t in taus))]
    want = _merge(method, tensors)
    strided = [t.t().contiguous().t() for t in tensors]  # same values, column-major
    assert not strided[0].is_contiguous()
    assert torch.equal(_merge(method, strided), want)
    out = torch.empty(61, 29, dtype=dtype).t()
    got = _merge(method, tensors, out)
    assert got is out and torch.equal(out, want)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_a_narrower_destination_that_overflows_is_refused(method):
    """Finite in float32, out of float16's range once written into a float16 ``out``: refused, not inf."""
    base, taus = _inputs(shape=(4, 4), n=1)
    with pytest.raises(NonFiniteError, match=f"'w' \\(method {method}\\)"):
        _merge(method, [base * 1e5, (base + taus[0]) * 1e5], torch.empty(4, 4, dtype=torch.float16))
