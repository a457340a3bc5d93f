"""Pure helpers of benchmarks/compare_mergekit.py: ulps, the accuracy rule, the statistics of random methods, and
a config for every method of the table that mergekit can be given (fast, no mergekit)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.merging.methods import METHODS
from mergesearch.merging.plan import MergePlan, mergekit_equivalent
from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def cm():
    return load_script("compare_mergekit")


def test_ulp_per_dtype(cm) -> None:
    x = torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64)
    assert cm.ulp(x, torch.float32).tolist()[:2] == [2.0**-23, 2.0**-24]
    assert cm.ulp(x, torch.bfloat16).tolist()[:2] == [2.0**-7, 2.0**-8]
    assert cm.ulp(x, torch.float16).tolist()[:2] == [2.0**-10, 2.0**-11]
    assert cm.ulp(x, torch.float16)[2].item() == 2.0**-24  # float16's subnormal spacing at 0


def test_accuracy_rule(cm) -> None:
    ref = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    unit = torch.full((3,), 0.125, dtype=torch.float64)
    theirs = torch.tensor([1.0, 1.25, 1.0])
    ours = torch.tensor([1.125, 1.0, 1.5])  # +1 unit (allowed), better, +4 units (3 over)
    r = cm.accuracy_rule(ours, theirs, ref, unit)
    assert r["violations"] == 1 and r["worst_excess_ulps"] == pytest.approx(3.0)
    assert r["ours_max"] == 0.5 and r["theirs_max"] == 0.25 and r["entries"] == 3


def test_change_stats_and_tolerance(cm) -> None:
    base = {"w": torch.zeros(4)}
    merged = {"w": torch.tensor([0.0, 1.0, -2.0, 0.0])}
    assert cm.change_stats(merged, base) == (3.0, 0.5)
    assert cm.stats_ok((3.0, 0.5), (3.1, 0.51))
    assert not cm.stats_ok((3.0, 0.5), (3.5, 0.5))
    assert not cm.stats_ok((3.0, 0.5), (3.0, 0.45))


def test_every_method_has_a_config_mergekit_can_be_given(cm) -> None:
    cfgs = cm.configs("/m/base", "/m/a", "/m/b", "/m/c")
    assert set(cfgs) == set(METHODS)
    for method, body in cfgs.items():
        plan = MergePlan.model_validate({"merge_method": method, **body, "dtype": "float32"})
        mk, why = mergekit_equivalent(plan)
        assert mk is not None or METHODS[method].mergekit is None, (method, why)
        assert mk is None or mk.merge_method == METHODS[method].mergekit


def test_which_methods_are_compared_by_statistics(cm) -> None:
    assert cm.is_statistical("dare_ties", 100) and cm.is_statistical("della_linear", 100)
    assert not cm.is_statistical("ties", 100) and not cm.is_statistical("arcee_fusion", 100)
    assert cm.is_statistical("arcee_fusion", 2_000_000)


def test_cutoff_ties(cm) -> None:
    tau = torch.tensor([0.5, -0.25, 0.25, 0.125, 1.0])
    # density 0.6: k = 3 largest |τ| -> cut at 0.25, held by two entries
    ties = cm.cutoff_ties([tau], [{"density": 0.6}], "magnitude")
    assert ties.tolist() == [False, True, True, False, False]
    assert not cm.cutoff_ties([tau], [{"density": 1.0}], "magnitude").any()
    # breadcrumbs, gamma 0.2: drop the largest (1.0), keep 3 of the rest -> band [0.25, 0.5]
    band = cm.cutoff_ties([tau], [{"density": 0.6, "gamma": 0.2}], "magnitude_outliers")
    assert band.tolist() == [True, True, True, False, False]


def test_accuracy_rule_separates_cutoff_ties(cm) -> None:
    ref = torch.zeros(2, dtype=torch.float64)
    unit = torch.ones(2, dtype=torch.float64)
    r = cm.accuracy_rule(torch.tensor([5.0, 3.0]), torch.zeros(2), ref, unit, torch.tensor([True, False]))
    assert r["violations"] == 2 and r["violations_at_tie"] == 1
    assert r["worst_excess_ulps"] == 4.0 and r["worst_excess_ulps_not_at_tie"] == 2.0
