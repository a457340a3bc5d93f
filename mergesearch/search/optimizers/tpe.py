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

The per-parameter Python work is the rest of the cost (~2 ms a parameter: two estimators, a truncated-normal
inversion, two mixture densities). So the continuous parameters of a trial (``FloatDistribution`` without a step)
are sampled together, as one stack of shape ``(P, ...)`` for ``P`` parameters, through the relative-sampling hook
(the parameters every finished trial has, in the order they were asked): each parameter's
random draws are taken in Optuna's order, the numerics are Optuna's, element by element, on the stacked arrays
(``log Φ`` compiled, :mod:`.normal_cdf`), and the truncated-normal inversion's Newton loop stops per parameter
and side as Optuna's does per call. Other parameters (stepped, integer, categorical) take the one-parameter path
above at their place in the order; a trial whose good or bad trials lack a continuous parameter takes it for all.

Only the independent path is changed (multivariate TPE is Optuna's own). It uses private parts of Optuna's TPE
(imported here; one that changed sends every later call to Optuna's own path, with a warning).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState

try:
    from optuna.samplers._tpe import _truncnorm
    from optuna.samplers._tpe.parzen_estimator import EPS, _ParzenEstimator
    from optuna.samplers._tpe.sampler import _split_trials, default_gamma, default_gamma_multiobjective
except ImportError:  # a changed optuna: Optuna's own path
    _split_trials = None

#: why the shared work is off in this process (a private part of Optuna's TPE did not behave as expected)
_DRIFT: list[str] = []
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SharedFitTPESampler(optuna.samplers.TPESampler):
    """``optuna.samplers.TPESampler`` (same arguments and proposals) that splits the finished trials and fits
    each parameter's good-trials estimator once per history, and samples a trial's continuous parameters
    together; see the module."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._history: tuple[Any, ...] | None = None  # (storage, study, (number, state) of each finished trial)
        self._split: tuple[list[FrozenTrial], list[FrozenTrial]] | None = None
        self._below: dict[Any, Any] = {}  # per parameter (or stack of parameters), its good-trials estimator
        #: per (storage, parameter), its internal value in each trial by trial id (a stored value never changes)
        self._values: dict[tuple[int, str, BaseDistribution], dict[int, float]] = {}
        #: the same for a stack of continuous parameters: per (storage, parameters), the ``(P,)`` values by trial id
        self._stack_rows: dict[tuple[Any, ...], dict[int, np.ndarray]] = {}
        #: per (storage, study): the numbers of the finished trials seen, and the parameters all of them have
        self._spaces: dict[tuple[int, int], tuple[set[int], dict[str, BaseDistribution]]] = {}

    def _shared(self, study: optuna.Study) -> bool:
        return _split_trials is not None and not _DRIFT and not self._is_multivariate(study)

    def _drifted(self, e: Exception) -> None:
        _DRIFT.append(f"{type(e).__name__}: {e}")
        optuna.logging.get_logger(__name__).warning("shared TPE fits unavailable (%s)", _DRIFT[0])

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """Multivariate: Optuna's. Independent: the parameters every finished trial has (same distribution, more
        than one value), in the order they were asked, so that :meth:`sample_relative` draws in Optuna's order."""
        if not self._shared(study):
            return super().infer_relative_search_space(study, trial)
        finished = study._get_trials(deepcopy=False, states=_FINISHED, use_cache=True)
        seen, space = self._spaces.setdefault((id(study._storage), study._study_id), (set(), {}))
        for t in finished:
            if t.number not in seen:
                if not seen:
                    space.update(t.distributions)
                for name in [n for n, d in space.items() if t.distributions.get(n) != d]:
                    del space[name]
                seen.add(t.number)
        return {n: d for n, d in space.items() if not d.single()}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """Multivariate: Optuna's. Independent: every parameter of the space that the trial is not given, each
        as Optuna's ``sample_independent`` would sample it (:meth:`_sample_stacked`)."""
        if not self._shared(study):
            return super().sample_relative(study, trial, search_space)
        finished = study._get_trials(deepcopy=False, states=_FINISHED, use_cache=True)
        fixed = trial.system_attrs.get("fixed_params", {})  # an enqueued trial's given values: not sampled
        space = {name: d for name, d in search_space.items() if name not in fixed}
        if not space or len(finished) < self._n_startup_trials:
            return {}
        try:
            return self._sample_stacked(study, trial, finished, space)
        except (AttributeError, TypeError) as e:  # Optuna's private TPE parts changed: Optuna's path from now on
            self._drifted(e)
            return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        finished = study._get_trials(deepcopy=False, states=_FINISHED, use_cache=True)
        if not self._shared(study) or len(finished) < self._n_startup_trials:
            return super().sample_independent(study, trial, param_name, param_distribution)
        try:
            below, above = self._split_for(study, trial, finished)
            return self._sample_one(study, below, above, param_name, param_distribution)
        except (AttributeError, TypeError) as e:  # Optuna's private TPE parts changed: Optuna's path from now on
            self._drifted(e)
            return super().sample_independent(study, trial, param_name, param_distribution)

    def _get_internal_repr(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """Optuna's ``(trials, {name: dist}, study) -> {name: (n,) values}``, each trial's value converted once:
        re-converted per estimator, the values cost as much as the estimator itself."""
        if _DRIFT or kwargs or len(args) != 3 or len(args[1]) != 1 or self._is_multivariate(args[2]):
            return super()._get_internal_repr(*args, **kwargs)
        trials, space, study = args
        ((name, dist),) = space.items()
        return {name: self._column(study, name, dist, trials)}

    def _column(self, study: optuna.Study, name: str, dist: BaseDistribution, trials: list[FrozenTrial]
                ) -> np.ndarray:
        """``(n,)`` internal values of ``name`` in the ``trials`` that have it."""
        known = self._values.setdefault((id(study._storage), name, dist), {})
        out = []
        for t in trials:
            v = known.get(t._trial_id)
            if v is None and name in t.params:
                v = known[t._trial_id] = dist.to_internal_repr(t.params[name])
            if v is not None:
                out.append(v)
        return np.asarray(out)

    def _rows(self, study: optuna.Study, dists: dict[str, BaseDistribution], trials: list[FrozenTrial]
              ) -> np.ndarray | None:
        """``(P, n)`` internal values of the ``P`` parameters ``dists`` in the ``n`` ``trials``; None when a trial
        lacks one. A finished trial's values are converted once."""
        known = self._stack_rows.setdefault((id(study._storage), tuple(dists.items())), {})
        rows = []
        for t in trials:
            row = known.get(t._trial_id)
            if row is None:
                if not dists.keys() <= t.params.keys():
                    return None
                row = np.array([d.to_internal_repr(t.params[n]) for n, d in dists.items()])
                if t.state.is_finished():
                    known[t._trial_id] = row
            rows.append(row)
        return np.stack(rows, axis=1)

    def _split_for(self, study: optuna.Study, trial: FrozenTrial, finished: list[FrozenTrial]
                   ) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
        """Optuna's good and bad trials for ``trial``: the split of the finished ones, made once per history,
        plus (constant liar) the other running trials among the bad."""
        history = (id(study._storage), study._study_id, *((t.number, t.state) for t in finished))
        if history != self._history:  # a result arrived: the split and every good-trials estimator are stale
            gamma = self._gamma or (default_gamma if len(study.directions) <= 1 else default_gamma_multiobjective)
            self._history, self._split, self._below = history, _split_trials(study, finished, gamma(len(finished))), {}
        below, above = self._split
        if self._constant_liar:  # running trials count as bad ones (``_split_trials`` puts them there, by number)
            running = [t for t in study._get_trials(deepcopy=False, states=(TrialState.RUNNING,), use_cache=False)
                       if t.number != trial.number]
            above = sorted(above + running, key=lambda t: t.number) if running else above
        return below, above

    def _sample_one(self, study: optuna.Study, below: list[FrozenTrial], above: list[FrozenTrial], name: str,
                    dist: BaseDistribution) -> Any:
        """What ``TPESampler._sample(study, trial, {name: dist})`` returns, from the shared split (``below``,
        ``above``: :meth:`_split_for`) and good-trials estimator."""
        space = {name: dist}
        mpe_below = self._below.get((name, dist))
        if mpe_below is None:
            mpe_below = self._below[name, dist] = self._build_parzen_estimator(study, space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(study, space, above, handle_below=False)
        samples = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        best = self._compare(samples, self._compute_acquisition_func(samples, mpe_below, mpe_above))
        return dist.to_external_repr(best[name])

    def _stackable(self, dist: BaseDistribution) -> bool:
        return (isinstance(dist, FloatDistribution) and dist.step is None
                and self._parzen_estimator_cls is _ParzenEstimator)

    def _sample_stacked(self, study: optuna.Study, trial: FrozenTrial, finished: list[FrozenTrial],
                        space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """Every parameter of ``space``: the continuous ones as one stack, the others one by one
        (:meth:`_sample_one`), the random draws in ``space``'s order. Empty (every parameter then takes
        ``sample_independent``) when a good or bad trial lacks one of the continuous ones."""
        below, above = self._split_for(study, trial, finished)
        floats = {name: d for name, d in space.items() if self._stackable(d)} if below and above else {}
        if floats:
            multi = study._is_multi_objective()
            key = tuple(floats.items())
            good = self._below.get(key)
            if good is None:
                if (obs := self._rows(study, floats, below)) is None:
                    return {}
                good = self._below[key] = self._fit(list(floats.values()), obs, below=True, multi=multi)
            if (obs := self._rows(study, floats, above)) is None:
                return {}
            bad = self._fit(list(floats.values()), obs, below=False, multi=multi)
        out: dict[str, Any] = {}
        rng, n, active, q = self._rng.rng, self._n_ei_candidates, [], []
        for name, dist in space.items():  # Optuna's draws per parameter: components, then quantiles
            if name in floats:
                active.append(rng.choice(len(good[0]), p=good[0], size=n))
                q.append(rng.uniform(low=0, high=1, size=n))
            else:
                out[name] = self._sample_one(study, below, above, name, dist)
        if floats:
            x = _best_of_candidates(list(floats.values()), good, bad, np.stack(active), np.stack(q))
            out.update({name: d.to_external_repr(v) for (name, d), v in zip(floats.items(), x.tolist(), strict=True)})
        return out

    def _fit(self, dists: list[FloatDistribution], obs: np.ndarray, *, below: bool, multi: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Optuna's Parzen estimator of ``P`` continuous parameters over the same ``n`` trials, stacked:
        ``(weights (n+1,), mus (P, n+1), sigmas (P, n+1))`` (the last component is the prior), on the estimators'
        scale (log for log parameters); ``obs`` ``(P, n)``."""
        params = self._parzen_estimator_parameters
        n = obs.shape[1]
        w = np.ones(n) if below and multi else _ParzenEstimator._call_weights_func(params.weights, n)
        w = np.append(w, [params.prior_weight])
        w /= w.sum()
        low = np.array([d.low for d in dists])
        high = np.array([d.high for d in dists])
        log = np.array([d.log for d in dists])
        if log.any():
            obs = obs.copy()
            obs[log], low[log], high[log] = np.log(obs[log]), np.log(low[log]), np.log(high[log])
        order = np.argsort(obs, axis=1)
        ends = np.empty((len(dists), n + 2))
        ends[:, 0], ends[:, 1:-1], ends[:, -1] = low, np.take_along_axis(obs, order, axis=1), high
        sorted_sigmas = np.maximum(ends[:, 1:-1] - ends[:, :-2], ends[:, 2:] - ends[:, 1:-1])
        if not params.consider_endpoints and n + 2 >= 4:
            sorted_sigmas[:, 0] = ends[:, 2] - ends[:, 1]
            sorted_sigmas[:, -1] = ends[:, -2] - ends[:, -3]
        sigmas = np.empty_like(sorted_sigmas)
        np.put_along_axis(sigmas, order, sorted_sigmas, axis=1)
        span = (high - low)[:, None]
        minsigma = span / min(100.0, 1.0 + (n + 1)) if params.consider_magic_clip else EPS
        sigmas = np.clip(sigmas, minsigma, span)
        return (w, np.concatenate([obs, (0.5 * (low + high))[:, None]], axis=1),
                np.concatenate([sigmas, span], axis=1))


def _bounds(dists: list[FloatDistribution]) -> tuple[np.ndarray, np.ndarray]:
    """``(P,)`` lower and upper bounds on the estimators' scale, as Optuna's batched distributions give them."""
    low = [math.log(d.low) if d.log else d.low for d in dists]
    high = [math.log(d.high) if d.log else d.high for d in dists]
    return np.array(low), np.array(high)


def _best_of_candidates(dists: list[FloatDistribution], good: tuple[np.ndarray, ...], bad: tuple[np.ndarray, ...],
                        active: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per parameter, the candidate that maximises log l(x) - log g(x): ``(P,)`` values. The candidates are
    drawn from the good estimator with components ``active`` and quantiles ``q`` (both ``(P, S)``)."""
    low, high = _bounds(dists)
    _, mus, sigmas = good
    mu, sigma = np.take_along_axis(mus, active, axis=1), np.take_along_axis(sigmas, active, axis=1)
    x = _ppf(q, (low[:, None] - mu) / sigma, (high[:, None] - mu) / sigma) * sigma + mu
    log = np.array([d.log for d in dists])
    x[log] = np.exp(x[log])
    at = x.copy()
    at[log] = np.log(x[log])
    acquisition = _log_pdf(at, good, low, high) - _log_pdf(at, bad, low, high)
    return np.take_along_axis(x, acquisition.argmax(axis=1)[:, None], axis=1)[:, 0]


def _log_pdf(x: np.ndarray, mixture: tuple[np.ndarray, ...], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``_MixtureOfProductDistribution.log_pdf`` of one continuous parameter per row: ``x`` ``(P, S)`` on the
    estimators' scale, mixture ``(weights (K,), mus (P, K), sigmas (P, K))``; returns ``(P, S)``."""
    w, mus, sigmas = mixture
    a, b = ((low[:, None] - mus) / sigmas)[:, None, :], ((high[:, None] - mus) / sigmas)[:, None, :]
    z = x[:, :, None] - mus[:, None, :]
    z /= sigmas[:, None, :]
    outside = (z < a) | (z > b)
    # Optuna's truncnorm.logpdf, operation for operation (in place): -(z**2) / 2 - log C - log mass - log sigma
    out = np.square(z, out=z)
    np.negative(out, out=out)
    out /= 2.0
    out -= _truncnorm._norm_pdf_logC
    out -= _truncnorm._log_gauss_mass(a, b)
    out -= np.log(sigmas)[:, None, :]
    out[outside] = -np.inf
    if (empty := a == b).any():
        out[np.broadcast_to(empty, out.shape)] = np.nan
    out += np.log(w)
    top = out.max(axis=-1)
    top[np.isneginf(top)] = 0
    out -= top[..., None]
    with np.errstate(divide="ignore"):
        return np.log(np.exp(out, out=out).sum(axis=-1)) + top


def _ppf(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_truncnorm.ppf`` of each row of ``(P, S)`` arrays as if called on that row alone: Optuna's Newton loop
    stops when a whole call has converged, so each (row, side) here stops on its own."""
    from mergesearch.search.optimizers.normal_cdf import log_ndtr

    left = a < 0
    log_mass = _truncnorm._log_gauss_mass(a, b)
    y = np.empty_like(q)
    y[left] = _truncnorm._log_sum(log_ndtr(a[left]), np.log(q[left]) + log_mass[left])
    right = ~left
    y[right] = _truncnorm._log_sum(log_ndtr(-b[right]), np.log1p(-q[right]) + log_mass[right])
    groups = 2 * np.arange(len(q))[:, None] + right  # (row, side): one Optuna call each
    x = _ndtri_exp(y.ravel(), groups.ravel(), 2 * len(q)).reshape(q.shape)
    out = np.where(left, x, -x)
    out[q == 0] = a[q == 0]
    out[q == 1] = b[q == 1]
    out[a == b] = math.nan
    return out


def _ndtri_exp(y: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """``_truncnorm._ndtri_exp`` of ``y`` ``(n,)``, each group of entries iterated until it has converged."""
    from mergesearch.search.optimizers.normal_cdf import log_ndtr

    flipped = y > -1e-2
    z = y.copy()
    z[flipped] = np.log(-np.expm1(y[flipped]))
    x = np.empty_like(y)
    small, moderate = z < -5, z >= -5
    x[small] = -np.sqrt(-2.0 * (z[small] + _truncnorm._norm_pdf_logC))
    x[moderate] = -_truncnorm._ndtri_exp_approx_C * np.log(np.expm1(-z[moderate]))
    live = np.ones(n_groups, dtype=bool)
    for _ in range(100):
        at = np.flatnonzero(live[groups])
        if not at.size:
            break
        xs = x[at]
        log_ndtr_x = log_ndtr(xs)
        log_norm_pdf_x = -0.5 * xs**2 - _truncnorm._norm_pdf_logC
        dx = (log_ndtr_x - z[at]) * np.exp(log_ndtr_x - log_norm_pdf_x)
        xs -= dx
        x[at] = xs
        live[:] = False
        live[groups[at[~(np.abs(dx) < 1e-8 * np.abs(xs))]]] = True
    x[flipped] *= -1
    return x
