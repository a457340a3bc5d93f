"""CMA-ES on a weighted sum of normalised objectives: the mergekit-evolve baseline, as a batch sampler.

The ``cma`` package's strategy is rebuilt on every batch by replaying the completed trials in trial order,
``popsize`` at a time (an incomplete last group is not told yet). Each objective is turned into minimisation
and min-max normalised over all completed trials before weighting, so objectives on different scales count
as the weights say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

from mergesearch.search.optimizers.base import BatchSampler, observed
from mergesearch.search.unit import from_unit


class CmaEsSumSampler(BatchSampler):
    """Single-objective CMA-ES (``cma``) on Σ_j w_j · normalised f_j, in the unit cube.

    Args:
        distributions: the search space.
        seed: sampler seed.
        weights: one non-negative weight per objective (None: equal weights).
        popsize: CMA-ES population size λ (None: the ``cma`` default 4 + 3·ln d).
        sigma0: initial step size in unit-cube coordinates.
    """

    def __init__(
        self,
        distributions: Mapping[str, BaseDistribution],
        seed: int,
        *,
        weights: Sequence[float] | None,
        popsize: int | None,
        sigma0: float = 0.25,
    ) -> None:
        super().__init__(distributions, seed)
        self.weights = None if weights is None else np.asarray(weights, dtype=float)
        self.popsize = popsize
        self.sigma0 = sigma0

    def scalarise(self, F: np.ndarray) -> np.ndarray:
        """Weighted sum of min-max normalised minimisation objectives; F (n, m) -> (n,)."""
        w = np.full(F.shape[1], 1.0 / F.shape[1]) if self.weights is None else self.weights
        lo, hi = F.min(0), F.max(0)
        return ((F - lo) / np.where(hi > lo, hi - lo, 1.0)) @ w

    def propose(self, study: optuna.Study, n: int) -> list[dict[str, Any]]:
        import cma

        X, F, _ = observed(study, self.distributions)
        d = len(self.distributions)
        opts = {
            "seed": int(self.batch_rng().integers(1, 2**31)),
            "bounds": [0.0, 1.0],
            "verbose": -9,
            # mirrored sampling re-derives points from told solutions deterministically: with replayed
            # (not own) solutions it would propose the same point on every batch
            "CMA_mirrors": 0,
        }
        if self.popsize is not None:
            opts["popsize"] = self.popsize
        es = cma.CMAEvolutionStrategy(np.full(d, 0.5), self.sigma0, opts)
        lam = es.popsize
        if len(X):
            f = self.scalarise(F)
            for start in range(0, len(X) - lam + 1, lam):
                es.ask()  # keeps the strategy's internal counters as in a live run
                es.tell(list(X[start : start + lam]), list(f[start : start + lam]))
        return [from_unit(np.asarray(x), self.distributions) for x in es.ask(n)]
