"""Pure helpers of benchmarks/kernel_side_by_side.py on small arrays: its float64 reference agrees with the kernel
it checks, the baseline gets the open band for task arithmetic, and the cut-off's bracket is the exact order
statistic (no worker processes)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging import kernels
from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def ksbs():
    module = load_script("kernel_side_by_side")
    module.CONFIG["entries"] = 1 << 16
    return module


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", ["task_arithmetic", "ties"])
def test_reference_agrees_with_the_kernel(ksbs, dtype, case) -> None:
    base, taus, cuts = ksbs.arrays(dtype)
    out = torch.full_like(base, float("nan"))
    kernels.fused_merge(base, out, taus, **ksbs.merge_args(case, cuts, baseline=False))
    ref = ksbs.reference(case, base, taus, cuts)
    tol = 1e-6 if dtype == "float32" else 1e-2
    close = torch.isclose(out.double(), ref, rtol=tol, atol=tol)
    assert close.double().mean() > 1 - 1e-3
    # the check the workers run would catch a kernel that wrote nothing
    assert not torch.isclose(torch.full_like(ref, float("nan")), ref).any()


def test_baseline_task_arithmetic_gets_the_open_band(ksbs) -> None:
    _, _, cuts = ksbs.arrays("float32")
    ours, theirs = (ksbs.merge_args("task_arithmetic", cuts, baseline=b) for b in (False, True))
    assert "lo" not in ours and theirs["lo"] == [-float("inf")] * 3 and theirs["hi"] == [float("inf")] * 3
    assert ksbs.merge_args("ties", cuts, baseline=True) == ksbs.merge_args("ties", cuts, baseline=False)


def test_bracket_bounds_select_the_cut_off(ksbs) -> None:
    tau = ksbs.arrays("float32")[1][0]
    n = tau.numel()
    rank = n - int(ksbs.CONFIG["density"] * n)
    assert kernels.bracket_select(tau, *ksbs.bracket_bounds(tau)) == tau.abs().sort().values[rank].item()
