"""Pure helpers of benchmarks/merge_speed.py: the bytes-moved formula, the triad, the floor, /usr/bin/time parsing,
the memory target and the classification of differing TIES entries (fast, no mergekit, no large model)."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def ms():
    return load_script("merge_speed")


def test_ideal_bytes_per_method(ms) -> None:
    n, k = 1000, 3
    # base + 3 task vectors read (4 B each), output written with read-for-ownership (2 × 4 B)
    assert ms.ideal_bytes("ties", n, k, 4) == n * (4 * 4 + 8)
    assert ms.ideal_bytes("task_arithmetic", n, k, 4) == ms.ideal_bytes("breadcrumbs_ties", n, k, 4)
    assert ms.ideal_bytes("ties", n, k, 4, write_allocate=False) == n * 5 * 4
    # linear reads its three inputs, no base
    assert ms.ideal_bytes("linear", n, k, 4) == n * (3 * 4 + 8)
    # DARE adds 3 int16 draws; DELLA 3 int16 draws and 3 float32 ranks; bfloat16 halves the tensors only
    assert ms.ideal_bytes("dare_ties", n, k, 2) == n * (4 * 2 + 3 * 2 + 4)
    assert ms.ideal_bytes("della", n, k, 2) == n * (4 * 2 + 3 * 6 + 4)
    assert ms.ideal_bytes("della_linear", n, k, 4) == n * (4 * 4 + 3 * 6 + 8)


def test_triad_on_a_small_array(ms) -> None:
    r = ms.triad(mib=2, threads=1, repeat=2)
    assert r["threads"] == 1 and r["best_s"] > 0
    n = 2 * ms.MIB // 4
    assert r["gbps"] == pytest.approx(ms.triad_bytes(n) / r["best_s"] / 1e9)
    assert r["gbps_stream"] == pytest.approx(r["gbps"] * 3 / 4)
    assert torch.get_num_threads() >= 1


def test_floor_is_bytes_over_bandwidth(ms) -> None:
    assert ms.floor_s("ties", 10**6, 3, "float32", gbps=1.0) == pytest.approx(24e6 / 1e9)
    assert ms.floor_s("ties", 10**6, 3, "bfloat16", gbps=2.0) == pytest.approx(12e6 / 2e9)


def test_parse_time_v(ms) -> None:
    text = ("\tCommand being timed: \"python x.py\"\n\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50\n"
            "\tMaximum resident set size (kbytes): 123456\n\tExit status: 0\n")
    assert ms.parse_time_v(text) == {"max_rss_kib": 123456, "wall_s": 62.5, "exit_status": 0}
    assert ms.parse_time_v("Elapsed (wall clock) time (h:mm:ss or m:ss): 1:00:01.00")["wall_s"] == 3601.0


def test_memory_target(ms) -> None:
    assert ms.memory_target_bytes(100, 3) == pytest.approx(575.0)


def test_ulp(ms) -> None:
    x = torch.tensor([1.0, 3.0, -0.5])
    assert ms.ulp(x).tolist() == [2.0**-23, 2.0**-22, 2.0**-24]
    assert ms.ulp(x.bfloat16()).tolist() == [2.0**-7, 2.0**-6, 2.0**-8]
    assert ms.ulp(x.half()).tolist() == [2.0**-10, 2.0**-9, 2.0**-11]


def test_classify_ties_diff(ms) -> None:
    theirs = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    ours = torch.tensor([1.0, 1.5, 1.0 + 2.0**-23, 1.25, 2.0])
    at_cut = torch.tensor([False, True, False, False, False])
    c = ms.classify_ties_diff(ours, theirs, at_cut)
    assert c == {"differing": 3, "at_cutoff_tie": 1, "one_ulp": 1, "other": 1, "max_abs_other": 0.25}


def test_plan_dict_parameters(ms, tmp_path) -> None:
    m = {k: tmp_path / k for k in ("base", "a", "b", "c")}
    ties = ms.plan_dict("ties", m, "bfloat16")
    assert ties["base_model"] == str(m["base"]) and ties["dtype"] == "bfloat16"
    assert [x["parameters"] for x in ties["models"]] == [{"weight": w, "density": 0.5} for w in (0.5, 0.3, 0.2)]
    assert "density" not in ms.plan_dict("task_arithmetic", m, "float32")["models"][0]["parameters"]
    assert "base_model" not in ms.plan_dict("linear", m, "float32")
