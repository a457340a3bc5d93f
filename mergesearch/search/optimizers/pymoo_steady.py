"""pymoo NSGA-III and SMS-EMOA, steady-state: no generation barrier, state rebuilt from stored trials.

On each batch the population is rebuilt from ALL completed trials with the algorithm's own survival
(ReferenceDirectionSurvival for NSGA-III, LeastHypervolumeContributionSurvival for SMS-EMOA) down to
``pop_size``, then n offspring come from the algorithm's mating operators (selection, SBX, PM, duplicate
elimination) in the unit cube. Until ``pop_size`` trials exist (completed or running) the points are Sobol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

from mergesearch.search.optimizers.base import BatchSampler, observed, sobol
from mergesearch.search.unit import from_unit

ALGORITHMS = ("nsga3", "smsemoa")


class PymooSteadySampler(BatchSampler):
    """A pymoo genetic algorithm run steady-state over the stored trials.

    Args:
        distributions: the search space.
        seed: sampler seed.
        algorithm: ``nsga3`` or ``smsemoa``.
        pop_size: population kept by survival selection.
        n_partitions: Das-Dennis partitions of the NSGA-III reference directions (None: chosen so that
            their number is close to ``pop_size``).
    """

    def __init__(
        self,
        distributions: Mapping[str, BaseDistribution],
        seed: int,
        *,
        algorithm: str,
        pop_size: int,
        n_partitions: int | None = None,
    ) -> None:
        super().__init__(distributions, seed)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.pop_size = pop_size
        self.n_partitions = n_partitions

    def _make(self, n_obj: int, rng_seed: int) -> Any:
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.algorithms.moo.sms import SMSEMOA
        from pymoo.core.problem import Problem
        from pymoo.util.ref_dirs import get_reference_directions

        d = len(self.distributions)
        problem = Problem(n_var=d, n_obj=n_obj, xl=np.zeros(d), xu=np.ones(d))
        if self.algorithm == "nsga3":
            p = self.n_partitions
            if p is None:  # the largest partition count whose direction count stays <= pop_size
                p = 1
                while len(get_reference_directions("das-dennis", n_obj, n_partitions=p + 1)) <= self.pop_size:
                    p += 1
            ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=p)
            algo = NSGA3(ref_dirs=ref_dirs, pop_size=self.pop_size)
        else:
            algo = SMSEMOA(pop_size=self.pop_size)
        algo.setup(problem, seed=rng_seed)
        return problem, algo

    def propose(self, study: optuna.Study, n: int) -> list[dict[str, Any]]:
        X, F, P = observed(study, self.distributions)
        d = len(self.distributions)
        rng_seed = int(self.batch_rng().integers(2**31))
        n_random = max(0, min(n, self.pop_size - len(X) - len(P)))
        if len(X) < 2:
            n_random = n
        points = [sobol(n_random, d, rng_seed)] if n_random else []
        if n - n_random > 0:
            points.append(self._offspring(X, F, n - n_random, rng_seed))
        pts = np.concatenate(points) if points else np.zeros((0, d))
        return [from_unit(x, self.distributions) for x in pts]

    def _offspring(self, X: np.ndarray, F: np.ndarray, n: int, rng_seed: int) -> np.ndarray:
        """Survival over all completed points, then mating; returns (n, d) offspring."""
        from pymoo.core.population import Population
        from pymoo.problems.static import StaticProblem

        problem, algo = self._make(F.shape[1], rng_seed)
        pop = Population.new(X=X)
        algo.evaluator.eval(StaticProblem(problem, F=F), pop)
        kwargs: dict[str, Any] = {}
        if self.algorithm == "smsemoa":
            kwargs = {"ideal": F.min(0), "nadir": F.max(0) + 1e-32}
        pop = algo.survival.do(
            problem, pop, n_survive=self.pop_size, algorithm=algo, random_state=algo.random_state, **kwargs
        )
        off = algo.mating.do(problem, pop, n, algorithm=algo, random_state=algo.random_state)
        Xo = off.get("X").reshape(-1, X.shape[1]) if len(off) else np.zeros((0, X.shape[1]))
        if len(Xo) < n:  # duplicate elimination could not make enough distinct children
            Xo = np.concatenate([Xo, algo.random_state.random((n - len(Xo), X.shape[1]))])
        return Xo[:n]
