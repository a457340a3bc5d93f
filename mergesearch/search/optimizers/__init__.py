"""Multi-objective optimizers behind one ask/tell interface, every one an Optuna sampler.

The Optuna study in storage is the only state: each backend is a sampler that rebuilds what it needs from
the stored trials, so an :class:`Optimizer` built on a re-opened study resumes whatever the backend.

Backends (``OPTIMIZERS``): ``random`` (scrambled Sobol, :mod:`.qmc`), ``tpe``, ``gp``, ``nsga2``, ``nsga3`` (Optuna's
samplers), ``qnehvi`` (BoTorch), ``pymoo-nsga3``, ``pymoo-smsemoa`` (pymoo, steady-state) and ``cmaes-sum``
(CMA-ES on a weighted sum, the mergekit-evolve baseline). Options per backend, with defaults:

- random: none · tpe, gp: ``n_startup`` (10) · nsga2, nsga3: ``pop_size`` (20)
- tpe: ``multivariate`` (false: Optuna's default for several objectives, one Parzen estimator per parameter;
  the split and the good-trials fits are redone per result, not per parameter, and a trial's continuous
  parameters are sampled as one stack, Optuna's proposals draw for draw: see :mod:`.tpe`; true: one joint
  estimator — other proposals)
- qnehvi: ``n_startup`` (10), ``fit_maxiter`` (100), ``num_restarts`` (2), ``raw_samples`` (64),
  ``mc_samples`` (64), ``alpha`` (box-decomposition approximation; default exact up to 3 objectives, 1e-2 above)
- pymoo-nsga3: ``pop_size`` (20), ``n_partitions`` (auto) · pymoo-smsemoa: ``pop_size`` (20)
- cmaes-sum: ``weights`` (equal), ``popsize`` (cma default), ``sigma0`` (0.25)
- hm3 (layer spaces only; see :mod:`.hm3`): ``n_startup`` (10), ``steps`` (60), ``update_steps`` (8),
  ``hidden`` (48), ``lr`` (3e-3),
  ``sigma`` (0.3), ``entropy`` (0.05), ``min_layers`` / ``max_layers`` (default: the stored job's space.layers),
  ``value_draws`` (16; 0: no value model), ``kappa`` (1.0)
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import ConfigError
from mergesearch.search.optimizers.base import BatchSampler
from mergesearch.search.optimizers.hm3 import OPTION_KEYS as HM3_OPTIONS
from mergesearch.search.optimizers.pending import SamplingStorage, new_pending, sample_pending
from mergesearch.search.optimizers.qmc import KeptSobolSampler
from mergesearch.search.optimizers.tpe import SharedFitTPESampler
from mergesearch.search.study import DRIVER_ID, create_trial, finish_trial, store_sampled


@dataclass(frozen=True)
class _Context:
    """What a backend factory gets: the space, a derived seed, validated options, the study's shape."""

    distributions: dict[str, BaseDistribution]
    seed: int  # derived from (user seed, trials already in the study)
    base_seed: int  # the user's seed as given
    options: dict[str, Any]
    n_objectives: int
    reference_point: list[float] | None
    start_points: tuple[dict[str, Any], ...] = ()  # the space's natural first points (see Optimizer)


def _int(v: Any, key: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"optimizer option {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def _random(c: _Context) -> optuna.samplers.BaseSampler:
    # QMCSampler keeps its position in the sequence in the study (a system attr keyed by the seed), so the
    # user's seed is kept as is: a resume continues the same scrambled sequence instead of replaying it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return KeptSobolSampler(
            qmc_type="sobol", scramble=True, seed=c.base_seed, warn_independent_sampling=False
        )


def _tpe(c: _Context) -> optuna.samplers.BaseSampler:
    multivariate = c.options.get("multivariate", False)
    if not isinstance(multivariate, bool):
        raise ConfigError(f"optimizer option 'multivariate' must be true or false, got {multivariate!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SharedFitTPESampler(
            seed=c.seed, n_startup_trials=_int(c.options.get("n_startup", 10), "n_startup", 0),
            # None keeps Optuna's default (independent for several objectives, joint for one)
            multivariate=True if multivariate else None,
        )


def _gp(c: _Context) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=c.seed, n_startup_trials=_int(c.options.get("n_startup", 10), "n_startup", 0))


def _nsga2(c: _Context) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(
        seed=c.seed, population_size=_int(c.options.get("pop_size", 20), "pop_size", 2)
    )


def _nsga3(c: _Context) -> optuna.samplers.BaseSampler:
    pop_size = _int(c.options.get("pop_size", 20), "pop_size", 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.NSGAIIISampler(seed=c.seed, population_size=pop_size)


def _qnehvi(c: _Context) -> optuna.samplers.BaseSampler:
    from mergesearch.search.optimizers.qnehvi import QNEHVISampler

    o = c.options
    return QNEHVISampler(
        c.distributions,
        c.seed,
        n_startup=_int(o.get("n_startup", 10), "n_startup", 0),
        reference_point=c.reference_point,
        fit_maxiter=_int(o.get("fit_maxiter", 100), "fit_maxiter"),
        num_restarts=_int(o.get("num_restarts", 2), "num_restarts"),
        raw_samples=_int(o.get("raw_samples", 64), "raw_samples"),
        mc_samples=_int(o.get("mc_samples", 64), "mc_samples"),
        alpha=None if o.get("alpha") is None else float(o["alpha"]),
    )


def _pymoo(algorithm: str) -> Callable[[_Context], optuna.samplers.BaseSampler]:
    def build(c: _Context) -> optuna.samplers.BaseSampler:
        from mergesearch.search.optimizers.pymoo_steady import PymooSteadySampler

        parts = c.options.get("n_partitions")
        return PymooSteadySampler(
            c.distributions,
            c.seed,
            algorithm=algorithm,
            pop_size=_int(c.options.get("pop_size", 20), "pop_size", 2),
            n_partitions=None if parts is None else _int(parts, "n_partitions"),
        )

    return build


def _cmaes_sum(c: _Context) -> optuna.samplers.BaseSampler:
    from mergesearch.search.optimizers.cmaes_sum import CmaEsSumSampler

    w = c.options.get("weights")
    if w is not None:
        ok = isinstance(w, (list, tuple)) and len(w) == c.n_objectives
        if not ok or not all(isinstance(v, (int, float)) and v >= 0 for v in w) or sum(w) <= 0:
            raise ConfigError(
                f"optimizer option 'weights' must be {c.n_objectives} non-negative numbers "
                f"(one per objective, not all 0), got {w!r}"
            )
    pop = c.options.get("popsize")
    sigma0 = c.options.get("sigma0", 0.25)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not 0 < sigma0 <= 1:
        raise ConfigError(f"optimizer option 'sigma0' must be in (0, 1], got {sigma0!r}")
    return CmaEsSumSampler(
        c.distributions,
        c.seed,
        weights=None if w is None else [float(v) for v in w],
        popsize=None if pop is None else _int(pop, "popsize", 2),
        sigma0=float(sigma0),
    )


def _hm3(c: _Context) -> optuna.samplers.BaseSampler:
    from mergesearch.search.optimizers.hm3 import HM3Sampler, check_layer_space, validate_options

    check_layer_space(c.distributions)  # one line naming the fix, before anything else
    # the user's seed as given: proposals depend on it and the stored trials only, so a resume reproduces them
    return HM3Sampler(c.distributions, c.base_seed, start=c.start_points, **validate_options(c.options))


#: name -> (factory, accepted option keys)
OPTIMIZERS: dict[str, tuple[Callable[[_Context], optuna.samplers.BaseSampler], frozenset[str]]] = {
    "random": (_random, frozenset()),
    "tpe": (_tpe, frozenset({"n_startup", "multivariate"})),
    "gp": (_gp, frozenset({"n_startup"})),
    "nsga2": (_nsga2, frozenset({"pop_size"})),
    "nsga3": (_nsga3, frozenset({"pop_size"})),
    "qnehvi": (_qnehvi, frozenset({"n_startup", "fit_maxiter", "num_restarts", "raw_samples", "mc_samples", "alpha"})),
    "pymoo-nsga3": (_pymoo("nsga3"), frozenset({"pop_size", "n_partitions"})),
    "pymoo-smsemoa": (_pymoo("smsemoa"), frozenset({"pop_size"})),
    "cmaes-sum": (_cmaes_sum, frozenset({"weights", "popsize", "sigma0"})),
    "hm3": (_hm3, HM3_OPTIONS),
}


def derive_seed(seed: int, n_trials: int) -> int:
    """A sampler seed from (user seed, trials already stored): a resume does not replay start-up points."""
    return int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])


def _check_distribution(name: str, dist: BaseDistribution) -> None:
    if not isinstance(dist, (FloatDistribution, IntDistribution, CategoricalDistribution)):
        raise ConfigError(f"parameter {name!r}: unsupported distribution {type(dist).__name__}")


def _pruned_value(trial: FrozenTrial, n_objectives: int) -> list[float] | None:
    """What ``study.tell`` stores as a pruned trial's value: its last intermediate value, single-objective only."""
    step = trial.last_step
    if step is None or n_objectives != 1:
        return None
    value = trial.intermediate_values[step]
    return None if math.isnan(value) else [float(value)]


class Optimizer:
    """Ask/tell over an Optuna study with one of the backends of :data:`OPTIMIZERS`.

    Args:
        study: the study (its storage holds every trial; the backend's state is rebuilt from it).
        distributions: the flat search space; every parameter is suggested on every trial.
        name: backend name, a key of :data:`OPTIMIZERS`.
        seed: user seed; the sampler seed is derived from it and the number of trials already stored.
        options: backend options (see the module docstring); unknown keys are a ConfigError.
        reference_point: per objective, the worst acceptable value (used by ``qnehvi``), or None.
        start_points: complete params the space marks as natural first points (a layer space's
            :meth:`~mergesearch.spaces.MergeSpace.source_paths`: the base and each expert as they are); a
            backend's start-up design may begin with them (``hm3`` does; the others draw theirs at random).
    """

    def __init__(
        self,
        study: optuna.Study,
        distributions: Mapping[str, BaseDistribution],
        *,
        name: str,
        seed: int,
        options: Mapping[str, Any],
        reference_point: Sequence[float] | None = None,
        start_points: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        if name not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
        if not distributions:
            raise ConfigError("the search space is empty: nothing to optimize")
        for key, dist in distributions.items():
            _check_distribution(key, dist)
        factory, keys = OPTIMIZERS[name]
        unknown = sorted(set(options) - keys)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for optimizer {name!r}; "
                f"accepted: {', '.join(sorted(keys)) or 'none'}"
            )
        m = len(study.directions)
        if reference_point is not None and (
            len(reference_point) != m or not all(math.isfinite(v) for v in reference_point)
        ):
            raise ConfigError(f"reference point needs {m} finite values (one per objective), got {reference_point!r}")
        self.study = study
        self.distributions = dict(distributions)
        self.name = name
        n_trials = len(study.get_trials(deepcopy=False))
        ctx = _Context(
            distributions=self.distributions,
            seed=derive_seed(seed, n_trials),
            base_seed=seed,
            options=dict(options),
            n_objectives=m,
            reference_point=None if reference_point is None else [float(v) for v in reference_point],
            start_points=tuple(dict(p) for p in start_points),
        )
        self.sampler = factory(ctx)
        study.sampler = self.sampler
        self._view: optuna.Study | None = None
        #: trials asked and not told yet, by number (tell needs no read for them)
        self._asked: dict[int, FrozenTrial] = {}
        #: True while nothing but this optimizer writes the study's trials (the search loop sets it while it holds
        #: the study's lease): the trials are then read at the first ask only, and kept current here as this
        #: optimizer creates and finishes them. Re-read per ask, they cost the driver more than anything else
        #: with many workers (optuna re-reads every trial from the oldest running one on).
        self.sole_writer = False
        self._trials: list[FrozenTrial] | None = None  # the study's trials, while sole_writer (None: read them)
        self._checked = False  # distributions checked against the stored ones

    def ask(self, n: int) -> list[FrozenTrial]:
        """Create n RUNNING trials with every parameter sampled; enqueued trials are served first.

        Each trial is sampled in memory (see :mod:`.pending`: the sampler gets the calls ``trial.suggest_*``
        would make, on the same data) and reaches the storage in one write with all its parameters and the
        user attr ``driver`` — one transaction per trial on a SQL database instead of one per parameter.

        Args:
            n: number of idle workers (>= 1).

        Returns:
            The n new trials, as stored (``trial.number`` identifies them in :meth:`tell`; ``trial.params``
            holds the parameters, ``trial.user_attrs`` what they were enqueued as).
        """
        return list(self.asking(n))

    def asking(self, n: int) -> Iterator[FrozenTrial]:
        """:meth:`ask`, yielding each trial as soon as it is stored, so that a driver can hand it to a worker
        while the next one is sampled (with n idle workers the first starts after one trial's sampling, not n).

        A batch backend still proposes the n points together, at the first trial. Do not write to the study
        between two trials (the trials are read once per call, or once for all calls while :attr:`sole_writer`).
        """
        if n < 1:
            raise ValueError(f"ask needs n >= 1, got {n}")
        storage, study_id = self.study._storage, self.study._study_id
        # at most one read per ask: the list is kept current here as trials are created (the old path re-read it
        # per trial, and TPE once more per parameter); none at all while this optimizer is the only writer
        kept = self.sole_writer and self._trials is not None
        stored = self._trials if kept else list(storage.get_all_trials(study_id, deepcopy=False))
        self._trials = stored if self.sole_writer else None
        try:
            yield from self._sample_batch(n, stored, reread=not kept)
        except GeneratorExit:  # the caller stopped early: every trial yielded is stored and in the list
            raise
        except BaseException:  # a trial may be stored and not listed: read them again next time
            self._trials = None
            raise

    def _sample_batch(self, n: int, stored: list[FrozenTrial], *, reread: bool) -> Iterator[FrozenTrial]:
        """The trials of :meth:`asking`; ``stored``: the study's trials, kept current (sorted by number);
        ``reread``: they were just read (the study's system attrs are read again too, else kept as the trials)."""
        study_id = self.study._study_id
        if isinstance(self.sampler, BatchSampler):
            waiting = sum(t.state == TrialState.WAITING for t in stored)
            self.sampler.clear()  # leftovers were proposed with older data
            self.sampler.batch_hint = max(1, n - waiting)
        genetic = isinstance(self.sampler, (optuna.samplers.NSGAIISampler, optuna.samplers.NSGAIIISampler))
        self._check_stored_distributions(stored)
        view = self._sampling_study()
        sampling: SamplingStorage = view._storage  # type: ignore[assignment]
        for i in range(n):
            trial, before = self._next_trial(stored)
            sampling.begin(study_id, trial, stored, reread=reread and i == 0)
            # Study.ask empties the samplers' per-trial cache of the study's trials: the same here, per trial
            view._thread_local.cached_all_trials = None
            try:
                # NSGA-II/III assign the generation in sample_relative; computing it first makes enqueued
                # trials count too (otherwise the genetic samplers ignore them). A refinement has every
                # parameter fixed, so other backends are not asked (a GP fit per refinement would be wasted).
                sample_pending(view, self.sampler, trial, self.distributions,
                               relative_first=genetic or "refine_of" not in trial.user_attrs)
            finally:
                study_attrs = sampling.end()
            trial.user_attrs["driver"] = DRIVER_ID
            self._store(trial, before, study_attrs)
            if before is None:
                stored.append(trial)
            else:
                stored[stored.index(before)] = trial
            self._asked[trial.number] = trial
            yield trial

    def _check_stored_distributions(self, stored: list[FrozenTrial]) -> None:
        """Each parameter's distribution must be compatible with the one it was first stored with (what optuna
        checks on every stored parameter, here once per optimizer, against the trials in memory)."""
        if self._checked:
            return
        for name, dist in self.distributions.items():
            first = next((t.distributions[name] for t in stored if name in t.distributions), None)
            if first is not None:
                try:
                    optuna.distributions.check_distribution_compatibility(first, dist)
                except ValueError as e:
                    raise ConfigError(f"parameter {name!r}: the study stored it as {first}, the space has {dist} "
                                      f"({e})") from None
        self._checked = True

    def _sampling_study(self) -> optuna.Study:
        """The study as the sampler sees it during :meth:`ask` (a :class:`.pending.SamplingStorage` over ours)."""
        if self._view is None:
            self._view = optuna.Study(study_name=self.study.study_name, storage=SamplingStorage(self.study._storage),
                                      sampler=self.sampler)
        self._view.sampler = self.sampler  # the backend may have been swapped since
        return self._view

    def _next_trial(self, stored: list[FrozenTrial]) -> tuple[FrozenTrial, FrozenTrial | None]:
        """The trial to sample next and its stored version: the first WAITING trial, set RUNNING (the same claim
        as ``study.ask``: a trial another process took meanwhile is skipped), else a new trial, not yet stored.
        """
        storage = self.study._storage
        for t in stored:
            if t.state != TrialState.WAITING:
                continue
            try:
                claimed = storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING)
            except optuna.exceptions.UpdateFinishedTrialError:
                claimed = False
            if claimed:
                trial = copy.deepcopy(t)
                trial.state = TrialState.RUNNING
                trial.datetime_start = datetime.datetime.now()
                return trial, t
        return new_pending(len(stored)), None

    def _store(self, trial: FrozenTrial, before: FrozenTrial | None, study_attrs: dict[str, Any]) -> None:
        """Write a sampled trial in one transaction (on a SQL database): a new one is created whole, a popped
        WAITING one gets what sampling added. ``study_attrs``: what the sampler noted on the study meanwhile."""
        storage, study_id = self.study._storage, self.study._study_id
        if before is None:
            trial._trial_id, trial.number = create_trial(storage, study_id, trial, study_attrs)
            return
        store_sampled(storage, study_id, trial._trial_id,
                      params={k: v for k, v in trial.params.items() if k not in before.params},
                      distributions=trial.distributions,
                      user_attrs={k: v for k, v in trial.user_attrs.items()
                                  if k not in before.user_attrs or before.user_attrs[k] != v},
                      system_attrs={k: v for k, v in trial.system_attrs.items()
                                    if k not in before.system_attrs or before.system_attrs[k] != v},
                      study_system_attrs=study_attrs)

    def tell(self, trial_number: int, values: Sequence[float] | None, *, error: str | None = None,
             pruned: bool = False, attrs: Mapping[str, Any] | None = None) -> None:
        """Finish a trial: COMPLETE with its objective values, PRUNED (stopped at a lower fidelity rung: no
        values, its partial scores are in ``attrs``), or FAIL with user attr ``fail_reason``.

        ``attrs``: user attrs stored with the result (e.g. :func:`~mergesearch.search.study.trial_record`), in the
        same transaction as the result on a SQL database. Non-finite values fail the trial (reason names them).
        A trial already finished is left as it is.
        """
        m = len(self.study.directions)
        if error is None and values is not None:
            values = [float(v) for v in values]
            if len(values) != m:
                raise ValueError(f"trial {trial_number}: {len(values)} values for {m} objectives")
            if not all(math.isfinite(v) for v in values):
                error = f"non-finite objective values {values}"
        if error is None and values is None and not pruned:
            error = "no values reported"
        attrs = dict(attrs or {})
        if error is not None:
            attrs["fail_reason"] = error
        storage, study_id = self.study._storage, self.study._study_id
        # a trial this optimizer asked for and has not told yet is known without a read; had something else
        # finished it meanwhile, the write below finds it finished and leaves it as it is
        frozen = self._asked.pop(trial_number, None)
        if frozen is None or pruned:  # a pruned trial's value is its last intermediate value: read it
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
            except KeyError:
                raise ValueError(f"trial {trial_number} does not exist in study {self.study.study_name!r}") from None
            frozen = storage.get_trial(trial_id)
        trial_id = frozen._trial_id
        if frozen.state.is_finished():
            return
        if frozen.state != TrialState.RUNNING:
            raise ValueError(f"trial {trial_number} is {frozen.state.name}, not RUNNING: it cannot be told")
        if error is not None:
            state, told = TrialState.FAIL, None
        elif pruned:
            state, told = TrialState.PRUNED, _pruned_value(frozen, m)
        else:
            state, told = TrialState.COMPLETE, values
        # as study.tell: the samplers' cached trials are stale once a result lands, and the sampler sees the
        # result before it is stored, which happens even if the sampler fails
        self.study._thread_local.cached_all_trials = None
        try:
            self.sampler.after_trial(self.study, frozen, state, told)
        finally:
            try:
                finish_trial(storage, trial_id, state, told, attrs)
            except optuna.exceptions.UpdateFinishedTrialError:  # finished meanwhile: left as is
                self._trials = None
            else:
                self._finished(frozen.number, state, told, attrs)

    def _finished(self, number: int, state: TrialState, values: list[float] | None, attrs: dict[str, Any]) -> None:
        """Keep the trial list current: trial ``number`` was just stored finished, with ``attrs`` (as JSON
        gives them back)."""
        trials = self._trials
        if trials is None:
            return
        if number >= len(trials) or trials[number].number != number:
            self._trials = None
            return
        done = copy.copy(trials[number])
        done.state, done.values, done.datetime_complete = state, values, datetime.datetime.now()
        done.user_attrs = {**done.user_attrs, **json.loads(json.dumps(attrs))}
        trials[number] = done

    def enqueue(self, params: Mapping[str, Any], user_attrs: Mapping[str, Any] | None = None) -> None:
        """Queue a parameter set to be evaluated before any proposal (e.g. a hand-tuned recipe).

        Missing parameters are sampled; unknown names or out-of-range values are a ConfigError. ``user_attrs``
        are stored on the trial (e.g. ``initial``, ``refine_of``).
        """
        for key, value in params.items():
            dist = self.distributions.get(key)
            if dist is None:
                raise ConfigError(f"initial point: unknown parameter {key!r}; known: {', '.join(self.distributions)}")
            try:
                ok = dist._contains(dist.to_internal_repr(value))
            except (ValueError, TypeError):
                ok = False
            if not ok:
                raise ConfigError(f"initial point: {key}={value!r} is outside its range {dist}")
        self.study.enqueue_trial(dict(params), user_attrs=dict(user_attrs or {}), skip_if_exists=False)
        self._trials = None  # a trial this optimizer did not sample: read them again


__all__ = ["OPTIMIZERS", "BatchSampler", "Optimizer", "derive_seed"]
