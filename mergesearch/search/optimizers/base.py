"""BatchSampler: an Optuna sampler that proposes a whole batch at once from the stored trials.

Our own backends (BoTorch, pymoo, CMA-ES) are batch methods: given every stored trial they propose n points
together (n = idle workers). Wrapping them as Optuna samplers keeps the study in storage the only state: on
resume a fresh sampler simply reads the trials again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mergesearch.search.unit import to_unit

#: user attr of a trial whose parameters were sampled at random because the batch backend proposed nothing for it
FALLBACK_ATTR = "proposal_fallback"


class BatchSampler(optuna.samplers.BaseSampler):
    """Base of batch backends: ``sample_relative`` pops from a queue that :meth:`propose` refills.

    Subclasses implement :meth:`propose`. The driver sets :attr:`batch_hint` to the number of idle workers
    before asking, and :meth:`clear` drops proposals left over from an earlier batch (they were made with
    older data). A trial that gets no proposal (``propose`` raised, or returned fewer points than trials asked)
    is sampled at random, and the trial records why in its user attr :data:`FALLBACK_ATTR`.

    Args:
        distributions: the full, fixed search space (every parameter suggested every trial).
        seed: seed of this sampler instance (already derived from the study's trial count by the caller).
    """

    def __init__(self, distributions: Mapping[str, BaseDistribution], seed: int) -> None:
        self.distributions = dict(distributions)
        self.seed = seed
        self.batch_hint = 1
        self._queue: list[dict[str, Any]] = []
        self._n_batches = 0
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._failure: str | None = None  # why the last propose gave nothing (its exception), if it failed

    def propose(self, study: optuna.Study, n: int) -> list[dict[str, Any]]:
        """Propose n new parameter sets from the trials stored in ``study``.

        Args:
            study: the study; completed trials are the data, RUNNING trials are pending points.
            n: batch size (>= 1).

        Returns:
            A list of at most n parameter dicts over :attr:`distributions`; fewer is allowed.
        """
        raise NotImplementedError

    def clear(self) -> None:
        """Drop proposals not yet served."""
        self._queue.clear()

    def batch_rng(self) -> np.random.Generator:
        """A generator for the current batch: reproducible from (seed, number of batches proposed)."""
        return np.random.default_rng([self.seed, self._n_batches])

    # --- optuna.samplers.BaseSampler -------------------------------------------------------------
    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.distributions)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # an enqueued trial: its params are fixed, do not waste a proposal on it
        if not self._queue:
            self._failure = None
            try:
                self._queue = list(self.propose(study, max(1, self.batch_hint)))
            except Exception as e:  # a numerical failure (e.g. a GP fit) must not stop a long search
                optuna.logging.get_logger(__name__).warning(
                    "%s: proposal failed, sampling at random for this trial", type(self).__name__, exc_info=True
                )
                self._failure = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
            self._n_batches += 1
        if self._queue:
            return self._queue.pop(0)
        # sampled at random instead: say so on the trial, or a broken backend passes for random search
        reason = self._failure or "the backend proposed fewer points than asked"
        study._storage.set_trial_user_attr(trial._trial_id, FALLBACK_ATTR, f"random ({reason})")
        return {}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def reseed_rng(self) -> None:
        self._fallback.reseed_rng()


def observed(
    study: optuna.Study, distributions: Mapping[str, BaseDistribution]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored data in unit-cube coordinates, objectives turned into minimisation.

    Returns:
        X: (n, d) completed points; F: (n, m) their objective values, negated for maximised objectives;
        P: (p, d) RUNNING (pending) points. Trials missing a parameter of the space are skipped.
    """
    d = len(distributions)
    sign = np.array([1.0 if s == optuna.study.StudyDirection.MINIMIZE else -1.0 for s in study.directions])
    xs, fs, ps = [], [], []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if not all(k in t.params for k in distributions):
            continue
        if t.state == TrialState.RUNNING:
            ps.append(to_unit(t.params, distributions))
        elif t.values is not None and np.all(np.isfinite(t.values)):
            xs.append(to_unit(t.params, distributions))
            fs.append(sign * np.asarray(t.values, dtype=float))
    m = len(sign)
    return (
        np.array(xs).reshape(-1, d),
        np.array(fs).reshape(-1, m),
        np.array(ps).reshape(-1, d),
    )


def sobol(n: int, d: int, seed: int) -> np.ndarray:
    """n scrambled Sobol points in [0, 1]^d, shape (n, d)."""
    import warnings

    from scipy.stats import qmc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "balance properties" warning when n is not a power of 2
        return qmc.Sobol(d, scramble=True, seed=seed).random(n)
