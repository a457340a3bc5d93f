"""Refinement: which trials are polished, in which order, and by how large a move."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from mergesearch.search.refine import MAX_HALVINGS, parents, refinements
from mergesearch.search.unit import to_unit

SPACE = {"method": CategoricalDistribution(["task_arithmetic", "ties"]),
         "w": FloatDistribution(0.0, 1.0), "d": FloatDistribution(0.1, 1.0)}


def _study(rows: list[tuple[float, float, dict]]) -> optuna.Study:
    """A (maximise acc, minimise l1) study; each row is (acc, l1, user attrs)."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    for i, (acc, l1, attrs) in enumerate(rows):
        study.add_trial(create_trial(params={"method": "ties", "w": 0.1 + 0.1 * i, "d": 0.5}, distributions=SPACE,
                                     values=[acc, l1], user_attrs=attrs))
    return study


def _add(study: optuna.Study, state: TrialState, attrs: dict) -> None:
    values = [0.0, 9.0] if state == TrialState.COMPLETE else None
    study.add_trial(create_trial(params={"method": "ties", "w": 0.5, "d": 0.5}, distributions=SPACE,
                                 values=values, user_attrs=attrs, state=state))


def test_parents_are_the_front_initial_recipes_first_then_fewest_attempts() -> None:
    study = _study([
        (0.5, 2.0, {}),                 # 0: front
        (0.4, 3.0, {"initial": True}),  # 1: strictly dominated by 0
        (0.6, 3.0, {"initial": True}),  # 2: front, a recipe
        (0.5, 2.0, {}),                 # 3: equal to 0: neither dominates the other
        (0.9, 5.0, {}),                 # 4: front
    ])
    assert [t.number for t in parents(study, SPACE)] == [2, 0, 3, 4]
    # two attempts on 0 (one of them dominated: still an attempt), one on 3, a failed one on 4 (re-run: free)
    _add(study, TrialState.COMPLETE, {"refine_of": 0})
    _add(study, TrialState.RUNNING, {"refine_of": 0})
    _add(study, TrialState.COMPLETE, {"refine_of": 3})
    _add(study, TrialState.FAIL, {"refine_of": 4})
    assert [t.number for t in parents(study, SPACE)] == [2, 4, 3, 0]


def test_a_recipe_beaten_by_a_refinement_leaves_the_parents() -> None:
    study = _study([(0.5, 2.0, {"initial": True}), (0.5, 1.9, {"refine_of": 0})])
    assert [t.number for t in parents(study, SPACE)] == [1]


def test_moves_are_gaussian_in_the_unit_cube_and_halve_per_attempt() -> None:
    study = _study([(0.5, 2.0, {})])
    for _ in range(2):
        _add(study, TrialState.FAIL, {"refine_of": 0})  # failed attempts do not count
    _add(study, TrialState.COMPLETE, {"refine_of": 0})  # one that counts (dominated by 0)
    step, seed = 0.01, 7
    out = refinements(study, SPACE, 3, step, seed)
    assert [parent for _, parent in out] == [0, 0, 0]  # one parent, cycled
    z = np.random.default_rng([seed, len(study.trials)]).normal(0.0, 1.0, (3, 3))
    x0 = to_unit(study.trials[0].params, SPACE)
    for k, (params, _) in enumerate(out):
        assert params["method"] == "ties"  # categorical parameters are kept
        moved = to_unit(params, SPACE) - x0
        sigma = step * 0.5 ** (1 + k)  # 1 attempt stored, then one more per point of this batch
        assert moved[1:] == pytest.approx(sigma * z[k, 1:], abs=1e-12)
    assert refinements(study, SPACE, 3, step, seed) == out  # reproducible from the stored trials


def test_sigma_stops_halving_and_points_stay_in_range() -> None:
    study = _study([(0.5, 2.0, {})])
    for _ in range(MAX_HALVINGS + 3):
        _add(study, TrialState.COMPLETE, {"refine_of": 0})
    params, _ = refinements(study, SPACE, 1, 0.5, 0)[0]
    z = np.random.default_rng([0, len(study.trials)]).normal(0.0, 1.0, 3)
    assert to_unit(params, SPACE)[1] - to_unit(study.trials[0].params, SPACE)[1] == pytest.approx(
        0.5 * 0.5**MAX_HALVINGS * z[1])
    wide = refinements(_study([(0.5, 2.0, {})]), SPACE, 50, 0.5, 1)
    assert all(0.0 <= p["w"] <= 1.0 and 0.1 <= p["d"] <= 1.0 for p, _ in wide)


def test_nothing_to_refine_without_completed_trials() -> None:
    study = _study([])
    _add(study, TrialState.FAIL, {})
    _add(study, TrialState.RUNNING, {})
    assert refinements(study, SPACE, 2, 0.01, 0) == []
