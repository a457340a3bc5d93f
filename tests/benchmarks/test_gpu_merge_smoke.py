"""benchmarks/gpu_merge.py on the CPU (no session has had a GPU): its triad, floors and ratios on tiny models."""

from __future__ import annotations

import pytest

from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def gm():
    return load_script("gpu_merge")


def test_device_triad_counts_write_allocate_bytes(gm) -> None:
    r = gm.device_triad("cpu", mib=2, repeat=2)
    assert r["best_s"] > 0
    assert r["gbps"] == pytest.approx(gm.triad_bytes(2 * gm.MIB // 4) / r["best_s"] / 1e9)


def test_in_place_rows_hold_floor_and_ratio(gm, tiny_models) -> None:
    rows = gm.in_place(tiny_models, "cpu", ["float32", "bfloat16"], ["linear", "ties"], repeat=1, gbps=10.0)
    assert [(r["dtype"], r["method"]) for r in rows] == [("float32", "linear"), ("float32", "ties"),
                                                         ("bfloat16", "linear"), ("bfloat16", "ties")]
    numel = gm.n_params(tiny_models)
    for r in rows:
        floor = gm.ideal_bytes(r["method"], numel, 3, gm._ELEM[r["dtype"]]) / 10e9
        assert r["floor_s"] == pytest.approx(floor)
        assert r["warm_s"] > 0 and r["ratio"] == pytest.approx(r["warm_s"] / r["floor_s"], rel=1e-3)


def test_main_refuses_cuda_without_a_device(gm, tmp_path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="no CUDA device"):
        gm.main(["--out", str(tmp_path / "x.json")])
