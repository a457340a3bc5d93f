"""Refinement: the last trials of a budget polish the Pareto front with small local moves.

Global optimizers rarely land next to a given point, yet the recipes a user would tune by hand often sit on a
plateau of discrete scores (exact match on a fixed test set): a slightly smaller weight keeps every answer and
lowers the cost, so a point a hair away strictly dominates the recipe. Refinement looks there. Each refinement
trial copies a parent trial and moves its float parameters by N(0, sigma^2) in the unit cube (categorical
parameters, such as the merge method, are kept). Parents are, in this order: the ``initial`` recipes that no
completed trial strictly dominates yet, then the other points of the front; fewest earlier attempts first.
Each failed attempt halves sigma for that parent, since a move too large for the plateau is the usual miss.

The study stays the only state: a refinement trial is an enqueued trial whose user attr ``refine_of`` names
its parent, so attempts are counted from storage and a resumed run goes on where it stopped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from mergesearch.search.pareto import non_dominated
from mergesearch.search.unit import from_unit, to_unit

#: sigma stops halving after this many failed attempts on one parent
MAX_HALVINGS = 6


def _attempts(study: optuna.Study) -> Counter[Any]:
    """Refinement attempts per parent trial number: refinement trials not failed (a failed one is re-run)."""
    return Counter(t.user_attrs.get("refine_of") for t in study.get_trials(deepcopy=False)
                   if t.state != TrialState.FAIL)


def parents(study: optuna.Study, distributions: Mapping[str, BaseDistribution],
            attempts: Counter[Any] | None = None) -> list[FrozenTrial]:
    """The trials to refine, best candidate first (``attempts``: :func:`_attempts`, when already counted).

    Returns:
        Completed trials that no completed trial strictly dominates, ``initial`` recipes first, then by fewest
        refinement attempts (trials not failed whose ``refine_of`` names them), then by trial number.
    """
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None and np.all(np.isfinite(t.values)) and all(k in t.params for k in distributions)]
    if not done:
        return []
    attempts = _attempts(study) if attempts is None else attempts
    front = [done[i] for i in non_dominated(np.array([t.values for t in done]), study.directions)]
    return sorted(front, key=lambda t: (not t.user_attrs.get("initial", False), attempts[t.number], t.number))


def refinements(study: optuna.Study, distributions: Mapping[str, BaseDistribution], n: int, step: float,
                seed: int) -> list[tuple[dict[str, Any], int]]:
    """Up to ``n`` refinement points, one per parent in :func:`parents` order (cycling if there are fewer).

    Args:
        study: the study; its completed trials are the candidates.
        distributions: the search space, in coordinate order.
        n: number of points wanted.
        step: sigma (unit-cube standard deviation) of a parent's first move; halved per failed attempt.
        seed: user seed; the generator also depends on the number of stored trials (reproducible, no replay).

    Returns:
        (params, parent trial number) pairs; empty when the study has no completed trial.
    """
    attempts = _attempts(study)
    order = parents(study, distributions, attempts)
    if not order or n < 1:
        return []
    moves = np.array([not isinstance(d, CategoricalDistribution) for d in distributions.values()])
    rng = np.random.default_rng([seed, len(study.get_trials(deepcopy=False))])
    out = []
    for i in range(n):
        parent = order[i % len(order)]
        sigma = step * 0.5 ** min(attempts[parent.number], MAX_HALVINGS)
        attempts[parent.number] += 1
        x = to_unit(parent.params, distributions)
        out.append((from_unit(np.where(moves, x + rng.normal(0.0, sigma, x.shape), x), distributions), parent.number))
    return out


__all__ = ["MAX_HALVINGS", "parents", "refinements"]
