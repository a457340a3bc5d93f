"""Optuna's TPE, with the work that only the results decide done once per result instead of once per parameter.

In independent mode (Optuna's default for several objectives) ``TPESampler._sample`` runs once per parameter of
every trial, and each run splits the finished trials into good and bad (a non-domination sort of every result)
and builds a Parzen estimator over the good ones. Between two results neither changes: with a per-layer space
(25–40 parameters) that is 25–40 identical sorts per trial, ~30 % of a ~100 ms ask, and with 16 workers the
driver, not the workers, sets the pace. Here the split of the finished trials is made once per history (the
set of finished trials), each parameter's good-trials estimator once per history, and each stored value is
converted to the estimators' scale once (not per estimator). The bad-trials estimator
is built per trial as Optuna does, since with the constant liar (Optuna's default) it also holds the trials
still running. The proposals are Optuna's, draw for draw: same data, same estimators, same random stream.

Only the independent path is changed (multivariate TPE is Optuna's own). It uses private parts of Optuna's TPE
(imported here; one that changed sends every later call to Optuna's own path, with a warning).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

try:
    from optuna.samplers._tpe.sampler import _split_trials, default_gamma, default_gamma_multiobjective
except ImportError:  # a changed optuna: Optuna's own path
    _split_trials = None

#: why the shared work is off in this process (a private part of Optuna's TPE did not behave as expected)
_DRIFT: list[str] = []
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SharedFitTPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` (same arguments and proposals) that splits the finished trials and fits
    each parameter's good-trials estimator once per history; see the module."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._history: tuple[Any, ...] | None = None  # (storage, study, (number, state) of each finished trial)
        self._split: tuple[list[FrozenTrial], list[FrozenTrial]] | None = None
        self._below: dict[tuple[str, BaseDistribution], Any] = {}  # per parameter, its good-trials estimator
        #: per (storage, parameter), its internal value in each trial by trial id (a stored value never changes)
        self._values: dict[tuple[int, str, BaseDistribution], dict[int, float]] = {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        finished = study._get_trials(deepcopy=False, states=_FINISHED, use_cache=True)
        if _split_trials is None or _DRIFT or len(finished) < self._n_startup_trials or self._is_multivariate(study):
            return super().sample_independent(study, trial, param_name, param_distribution)
        try:
            return self._sample_one(study, trial, finished, param_name, param_distribution)
        except (AttributeError, TypeError) as e:  # Optuna's private TPE parts changed: Optuna's path from now on
            _DRIFT.append(f"{type(e).__name__}: {e}")
            optuna.logging.get_logger(__name__).warning("shared TPE fits unavailable (%s)", _DRIFT[0])
            return super().sample_independent(study, trial, param_name, param_distribution)

    def _get_internal_repr(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Optuna's ``(trials, {name: dist}, study) -> {name: (n,) values}``, each trial's value converted once:
        re-converted per estimator, the values cost as much as the estimator itself."""
        if _DRIFT or kwargs or len(args) != 3 or len(args[1]) != 1 or self._is_multivariate(args[2]):
            return super()._get_internal_repr(*args, **kwargs)
        trials, space, study = args
        ((name, dist),) = space.items()
        known = self._values.setdefault((id(study._storage), name, dist), {})
        out = []
        for t in trials:
            v = known.get(t._trial_id)
            if v is None and name in t.params:
                v = known[t._trial_id] = dist.to_internal_repr(t.params[name])
            if v is not None:
                out.append(v)
        return {name: np.asarray(out)}

    def _sample_one(self, study: optuna.Study, trial: FrozenTrial, finished: list[FrozenTrial], name: str,
                    dist: BaseDistribution) -> Any:
        """What ``TPESampler._sample(study, trial, {name: dist})`` returns, from the shared split and estimator."""
        history = (id(study._storage), study._study_id, *((t.number, t.state) for t in finished))
        if history != self._history:  # a result arrived: the split and every good-trials estimator are stale
            gamma = self._gamma or (default_gamma if len(study.directions) <= 1 else default_gamma_multiobjective)
            self._history, self._split, self._below = history, _split_trials(study, finished, gamma(len(finished))), {}
        below, above = self._split
        if self._constant_liar:  # running trials count as bad ones (``_split_trials`` puts them there, by number)
            running = [t for t in study._get_trials(deepcopy=False, states=(TrialState.RUNNING,), use_cache=False)
                       if t.number != trial.number]
            above = sorted(above + running, key=lambda t: t.number) if running else above
        space = {name: dist}
        mpe_below = self._below.get((name, dist))
        if mpe_below is None:
            mpe_below = self._below[name, dist] = self._build_parzen_estimator(study, space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(study, space, above, handle_below=False)
        samples = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, mpe_below, mpe_above))
        return dist.to_external_repr(best[name])
