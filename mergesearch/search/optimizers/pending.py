"""Sampling a trial in memory, so that it reaches the storage in one write.

Optuna's ask-and-tell stores a trial as it is sampled: the trial is created, then every ``suggest_*`` is a
transaction of its own (with a SQLite file, an fsync each), and TPE re-reads every trial of the study once per
parameter. Here the sampler sees the study through :class:`SamplingStorage`: the trial being sampled (the
*pending* trial) lives in memory until every parameter is known — what the sampler writes on it is kept there —
and the study's trials come from one read per ask, kept current as the ask creates trials, the pending trial
included (the driver is the study's only writer, so re-reading would return the same trials).
:class:`~mergesearch.search.optimizers.Optimizer` then creates the trial with all its parameters and attrs in
one transaction.

To the sampler nothing changes: it gets the same calls, in the same order, on the same data as under
``study.ask()`` + ``trial.suggest_*`` (:func:`sample_pending` follows ``optuna.Trial._suggest``), so a seeded
sampler proposes the same parameters.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Container, Sequence
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    check_distribution_compatibility,
)
from optuna.storages import BaseStorage
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StudyError

if TYPE_CHECKING:
    from optuna.study._frozen import FrozenStudy


def new_pending(number: int) -> FrozenTrial:
    """A RUNNING trial not yet in storage, numbered as the storage will number it (``number`` = trials stored).

    Its trial id is a negative placeholder until the trial is created.
    """
    return FrozenTrial(number=number, state=TrialState.RUNNING, value=None, datetime_start=datetime.datetime.now(),
                       datetime_complete=None, params={}, distributions={}, user_attrs={}, system_attrs={},
                       intermediate_values={}, trial_id=-1 - number)


class SamplingStorage(BaseStorage):
    """The storage as a sampler sees it while one pending trial is sampled.

    Every call goes to ``inner`` except: writes on the pending trial (a sampler's system attrs, e.g. NSGA-II's
    generation or a backend's fallback note) are kept on the pending trial, and the sampler's notes on the
    study (system attrs, e.g. a QMC sampler's position in its sequence) are kept in :attr:`study_system_attrs`
    — both are written with the trial, in the same transaction; reads of the pending trial return it; the
    study's trials come from one snapshot taken when the pending trial was set (:meth:`begin`), with the
    pending trial in it as it is now (a sampler re-reading between two parameters sees the first), and each
    PRUNED trial (stopped at a lower fidelity rung) as a COMPLETE one valued at the last rung it reached, its
    best estimate of its full-fidelity scores (:func:`~mergesearch.search.fidelity.best_estimate`; a pruned
    trial without such scores is left out). Only the samplers see this view: the study, its front and
    hypervolume keep the stored states.

    Args:
        inner: the study's storage.
    """

    def __init__(self, inner: BaseStorage) -> None:
        self.inner = inner
        self.pending: FrozenTrial | None = None
        #: study system attrs the sampler set while the pending trial was sampled (to be written with it)
        self.study_system_attrs: dict[str, Any] = {}
        self._study_id: int | None = None
        self._snapshot: list[FrozenTrial] | None = None
        self._study_attrs: dict[str, Any] | None = None  # the study's system attrs, kept current (see begin)
        #: per study id, its objective names (user attr ``objective_names``), read when a pruned trial first
        #: needs them: a pruned trial's partial scores are stored by name
        self._names: dict[int, list[str]] = {}
        #: a pruned trial as the samplers see it, by trial id (a finished trial does not change)
        self._estimates: dict[int, FrozenTrial | None] = {}

    def begin(self, study_id: int, pending: FrozenTrial, stored: list[FrozenTrial], *, reread: bool) -> None:
        """Sample ``pending`` now; ``stored``: the study's trials, current (sorted by number).

        ``reread``: read the study's system attrs again (else those of the last call, with what sampling noted
        since: while nothing else writes the study).
        """
        self._study_id = study_id
        self.pending = pending
        self.study_system_attrs = {}
        if reread:
            self._study_attrs = None
        # a popped WAITING trial is in storage already: the pending copy replaces it. A PRUNED trial is shown as
        # COMPLETE with its last rung's scores (see mergesearch.search.fidelity): hidden, it would teach the
        # sampler nothing, and a model-based sampler would go on proposing where its proposals are pruned
        snapshot = []
        for t in stored:
            if t.number == pending.number:
                snapshot.append(pending)
            elif t.state != TrialState.PRUNED:
                snapshot.append(t)
            else:
                estimate = self._estimate(study_id, t)
                if estimate is not None:
                    snapshot.append(estimate)
        if not any(t is pending for t in snapshot):
            snapshot.append(pending)
        self._snapshot = snapshot

    def _estimate(self, study_id: int, trial: FrozenTrial) -> FrozenTrial | None:
        """A pruned trial as the samplers see it (None: not at all)."""
        from mergesearch.search.fidelity import best_estimate

        if trial._trial_id not in self._estimates:
            if study_id not in self._names:
                names = self.inner.get_study_user_attrs(study_id).get("objective_names")
                self._names[study_id] = [str(n) for n in names] if isinstance(names, list) else []
            self._estimates[trial._trial_id] = best_estimate(trial, self._names[study_id])
        return self._estimates[trial._trial_id]

    def end(self) -> dict[str, Any]:
        """Back to a plain pass-through; returns the study system attrs to write with the trial."""
        noted, self.study_system_attrs = self.study_system_attrs, {}
        if self._study_attrs is not None:
            self._study_attrs.update(noted)  # written with the trial: later trials of this ask read them
        self.pending = None
        self._snapshot = None
        return noted

    def _is_pending(self, trial_id: int) -> bool:
        return self.pending is not None and trial_id == self.pending._trial_id

    # --- reads ----------------------------------------------------------------------------------------
    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if self._snapshot is None or study_id != self._study_id:
            return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        trials = self._snapshot if states is None else [t for t in self._snapshot if t.state in states]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        return self.pending if self._is_pending(trial_id) else self.inner.get_trial(trial_id)  # type: ignore[return-value]

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        if self.pending is not None and study_id == self._study_id and trial_number == self.pending.number:
            return self.pending._trial_id
        return self.inner.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial_number_from_id(self, trial_id: int) -> int:
        return self.pending.number if self._is_pending(trial_id) else self.inner.get_trial_number_from_id(trial_id)  # type: ignore[union-attr]

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        if self._is_pending(trial_id):
            return self.pending.distributions[param_name].to_internal_repr(self.pending.params[param_name])  # type: ignore[union-attr]
        return self.inner.get_trial_param(trial_id, param_name)

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.inner.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.inner.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.inner.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.inner.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        if self.pending is None or study_id != self._study_id:
            return self.inner.get_study_system_attrs(study_id)
        if self._study_attrs is None:
            self._study_attrs = dict(self.inner.get_study_system_attrs(study_id))
        return {**self._study_attrs, **self.study_system_attrs}

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.inner.get_all_studies()

    # --- writes on the pending trial stay in memory ----------------------------------------------------
    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._is_pending(trial_id):
            self.pending.user_attrs[key] = value  # type: ignore[union-attr]
        else:
            self.inner.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._is_pending(trial_id):
            self.pending.system_attrs[key] = value  # type: ignore[union-attr]
        else:
            self.inner.set_trial_system_attr(trial_id, key, value)

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        if self._is_pending(trial_id):
            self.pending.params[param_name] = distribution.to_external_repr(param_value_internal)  # type: ignore[union-attr]
            self.pending.distributions[param_name] = distribution  # type: ignore[union-attr]
        else:
            self.inner.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        if self._is_pending(trial_id):
            raise StudyError(f"trial {self.pending.number} is being sampled: its state cannot change yet")  # type: ignore[union-attr]
        return self.inner.set_trial_state_values(trial_id, state, values)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        if self._is_pending(trial_id):
            self.pending.intermediate_values[step] = intermediate_value  # type: ignore[union-attr]
        else:
            self.inner.set_trial_intermediate_value(trial_id, step, intermediate_value)

    # --- everything else is the study's storage --------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        return self.inner.create_new_study(directions, study_name)

    def delete_study(self, study_id: int) -> None:
        self.inner.delete_study(study_id)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.inner.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        if self.pending is not None and study_id == self._study_id:
            self.study_system_attrs[key] = value
        else:
            self.inner.set_study_system_attr(study_id, key, value)

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.inner.create_new_trial(study_id, template_trial)

    def remove_session(self) -> None:
        self.inner.remove_session()


def _single_value(dist: BaseDistribution) -> Any:
    """The only value of a one-value distribution (as ``optuna.distributions._get_single_value``)."""
    return dist.choices[0] if isinstance(dist, CategoricalDistribution) else dist.low  # type: ignore[attr-defined]


class _Relative:
    """The sampler's relative proposal for one trial, computed at most once (``Trial.relative_params``)."""

    def __init__(self, study: optuna.Study, sampler: optuna.samplers.BaseSampler, trial: FrozenTrial) -> None:
        self.study, self.sampler, self.trial = study, sampler, trial
        self.space: dict[str, BaseDistribution] = {}
        self._params: dict[str, Any] | None = None

    @property
    def params(self) -> dict[str, Any]:
        if self._params is None:
            self.space = self.sampler.infer_relative_search_space(self.study, self.trial)
            self._params = self.sampler.sample_relative(self.study, self.trial, self.space)
        return self._params


def sample_pending(study: optuna.Study, sampler: optuna.samplers.BaseSampler, trial: FrozenTrial,
                   distributions: dict[str, BaseDistribution], *, relative_first: bool) -> None:
    """Fill ``trial.params`` with every parameter of ``distributions``, as ``trial.suggest_*`` would.

    ``study`` is the sampling view (its storage a :class:`SamplingStorage` whose pending trial is ``trial``).
    The rules and their order are ``optuna.Trial._suggest``'s: a fixed (enqueued) value, else the only value of
    a one-value distribution, else the sampler's relative proposal if it covers the parameter and lies in its
    range, else ``sample_independent``. The relative proposal is computed at most once: first when
    ``relative_first`` (as the old ask touched ``trial.relative_params`` right after ``study.ask()``), else
    when a parameter first needs it.

    Values are kept in their canonical form (through the distribution's internal representation), i.e.
    exactly as the storage returns them.
    """
    sampler.before_trial(study, trial)
    fixed: dict[str, Any] = trial.system_attrs.get("fixed_params", {})
    relative = _Relative(study, sampler, trial)
    if relative_first:
        _ = relative.params
    for name, dist in distributions.items():
        value = _choose(study, sampler, trial, name, dist, fixed, relative)
        internal = dist.to_internal_repr(value)  # raises ValueError on NaN and the like, as suggest_* does
        trial.params[name] = dist.to_external_repr(internal)
        trial.distributions[name] = dist


def _choose(study: optuna.Study, sampler: optuna.samplers.BaseSampler, trial: FrozenTrial, name: str,
            dist: BaseDistribution, fixed: dict[str, Any], relative: _Relative) -> Any:
    if name in trial.distributions:  # already set (a trial re-run with its params)
        check_distribution_compatibility(trial.distributions[name], dist)
        return trial.params[name]
    if name in fixed:
        value = fixed[name]
        if not dist._contains(dist.to_internal_repr(value)):
            optuna.logging.get_logger(__name__).warning(
                "Fixed parameter %s with value %s is out of range for distribution %s.", name, value, dist)
        return value
    if dist.single():
        return _single_value(dist)
    if name in relative.params:
        if name not in relative.space:
            raise ValueError(f"The parameter {name} was sampled by `sample_relative` method but it is not "
                             "contained in the relative search space.")
        check_distribution_compatibility(relative.space[name], dist)
        if dist._contains(dist.to_internal_repr(relative.params[name])):
            return relative.params[name]
    return sampler.sample_independent(study, trial, name, dist)
