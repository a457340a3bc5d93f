"""Batched ask/tell writes store exactly what the field-by-field path stored, in one transaction per ask and tell.

The reference is the previous implementation of ``Optimizer.ask``/``tell`` (``study.ask()``, one
``trial.suggest_*`` per parameter, then one ``set_user_attr`` per attr and ``study.tell``), kept here verbatim in
:func:`old_ask` / :func:`old_tell`. The same scripted run — enqueued points (a partial initial point, a refinement),
batches of idle workers, a failure, a pruned trial, a late report — goes through both on fresh studies with the
same seed; every trial must come out the same: state, values, params, distributions, user and system attrs, and
the study's system attrs (e.g. a QMC sampler's position, NSGA-II's parent cache).
"""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

import mergesearch.search.study as study_mod
from mergesearch.search.optimizers import OPTIMIZERS, BatchSampler, Optimizer
from mergesearch.search.study import DRIVER_ID, open_study, set_trial_attrs
from tests.search.test_optimizers import CHEAP, OBJECTIVES, space_of, zdt1


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution):
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    raise AssertionError(dist)


def old_ask(opt: Optimizer, n: int) -> list:
    """``Optimizer.ask`` as it was before batched writes (one transaction per parameter and attr)."""
    if isinstance(opt.sampler, BatchSampler):
        waiting = len(opt.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        opt.sampler.clear()
        opt.sampler.batch_hint = max(1, n - waiting)
    genetic = isinstance(opt.sampler, (optuna.samplers.NSGAIISampler, optuna.samplers.NSGAIIISampler))
    trials = []
    for _ in range(n):
        trial = opt.study.ask()
        if genetic or "refine_of" not in trial.user_attrs:
            _ = trial.relative_params
        for name, dist in opt.distributions.items():
            _suggest(trial, name, dist)
        trial.set_user_attr("driver", DRIVER_ID)
        trials.append(trial)
    return trials


def old_tell(opt: Optimizer, number: int, values, *, error=None, pruned=False, attrs=None) -> None:
    """``Optimizer.tell`` as it was before batched writes."""
    import math

    m = len(opt.study.directions)
    if error is None and values is not None:
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            error = f"non-finite objective values {values}"
    if error is None and values is None and not pruned:
        error = "no values reported"
    attrs = dict(attrs or {})
    if error is not None:
        attrs["fail_reason"] = error
    try:
        set_trial_attrs(opt.study, number, attrs)
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    if error is not None:
        opt.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    elif pruned:
        opt.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
    else:
        assert len(values) == m
        opt.study.tell(number, values, skip_if_finished=True)


def drive(opt: Optimizer, ask, tell) -> None:
    """The scripted run: enqueued points first, batches of 2 and 3 idle workers, a failure, async asks with trials
    still running, a pruned trial, a late report on a finished trial."""
    point = {"x0": 0.5, "x1": 0.25, "x2": 0.0, "x3": 1.0, "lr": 1e-3, "k": 2, "c": "b"}
    if any(k.startswith("layer.") for k in opt.distributions):
        point.update({f"layer.{k}": "merged" for k in range(4)})
    opt.enqueue({"x0": 0.1, "k": 5}, {"initial": True})  # partial: the rest is sampled
    opt.enqueue(point, {"refine_of": 0})
    record = {"plan": {"method": "ties", "weights": [0.5, 0.5]}, "family": "static", "summary": "s", "worker": "w",
              "timings": {"merge": 0.1, "eval": 0.2}, "attempts": 1}
    first = ask(opt, 3)
    for t in first:
        tell(opt, t.number, zdt1(t.params), attrs=record)
    bad = ask(opt, 2)
    tell(opt, bad[0].number, None, error="out of memory", attrs=record)
    running = ask(opt, 2)
    for _ in range(3):
        new = ask(opt, 2)  # asked while two are still running
        for t in running:
            tell(opt, t.number, zdt1(t.params), attrs=record)
        running = new
    for t in running:
        tell(opt, t.number, [float("nan"), 1.0], attrs=record)  # non-finite: failed with its reason
    # pruned last: the new path shows the samplers a pruned trial valued at its last rung (here it has no rung
    # scores: hidden), the old one showed it PRUNED; so no later proposal depends on the difference
    tell(opt, bad[1].number, None, pruned=True, attrs={**record, "partial": {"f1": 0.3}})
    tell(opt, first[0].number, [0.0, 0.0])  # a late report: left as it is


def snapshot(study: optuna.Study) -> tuple[list[tuple], dict]:
    trials = [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs)
              for t in study.get_trials(deepcopy=False)]
    return trials, study._storage.get_study_system_attrs(study._study_id)


def both(name: str, url_old: str, url_new: str, seed: int = 3, sole_writer: bool = False) -> tuple[tuple, tuple]:
    """The scripted run through the old and the new path (studies ``old`` and ``new``); both as stored.

    ``sole_writer``: the new path keeps the trials in memory between asks (as the search loop does under its
    lease); its list must then equal what the storage holds.
    """
    out = []
    for url, study_name, ask, tell in ((url_old, "old", old_ask, old_tell), (url_new, "new", Optimizer.ask,
                                                                               Optimizer.tell)):
        study = open_study(url, study_name, OBJECTIVES)
        opt = Optimizer(study, space_of(name), name=name, seed=seed, options=CHEAP[name])
        opt.sole_writer = sole_writer and ask is Optimizer.ask
        drive(opt, ask, tell)
        out.append(snapshot(open_study(url, study_name, OBJECTIVES)))  # read back from storage, not a cache
        if opt.sole_writer:
            assert opt._trials is not None, "the kept list was dropped although nothing else wrote"
            kept = [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
                     t.intermediate_values) for t in opt._trials]
            stored = [(t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
                       t.intermediate_values) for t in study._storage.get_all_trials(study._study_id)]
            assert kept == stored
    return out[0], out[1]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sqlite_trials_identical_to_field_by_field_writes(name, tmp_path):
    """As the search loop runs: the optimizer keeps the trials between asks (the other tests here and the
    PostgreSQL one read them per ask)."""
    old, new = both(name, f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}", sole_writer=True)
    assert len(new[0]) == 13
    for a, b in zip(old[0], new[0], strict=True):
        assert a == b, f"{name}: trial {a[0]} differs"
    assert old[1] == new[1]


@pytest.mark.parametrize("name", ["random", "tpe", "nsga2", "qnehvi"])
def test_public_storage_path_identical(name, tmp_path, monkeypatch):
    """In memory, in a journal file, and on SQLite with the batched path switched off (what another optuna or
    storage gets)."""
    old, new = both(name, "memory://", "memory://")
    assert old == new
    old, new = both(name, f"journal://{tmp_path / 'old.log'}", f"journal://{tmp_path / 'new.log'}")
    assert old == new
    monkeypatch.setattr(study_mod, "_rdb", lambda storage: None)
    old, new = both(name, f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}")
    assert old == new


@pytest.mark.parametrize("name", ["tpe", "random"])
def test_postgres_trials_identical(name, postgres_url):
    """Both studies in one database (the trial ids differ, so no backend that stores them: not NSGA-II)."""
    old, new = both(name, postgres_url, postgres_url)
    assert study_mod._rdb(open_study(postgres_url, "new", OBJECTIVES)._storage) is not None  # the batched path
    assert old == new


def test_changed_private_api_falls_back_and_writes_everything(tmp_path, monkeypatch):
    """A TypeError inside the batched path (optuna changed a private helper) rolls the transaction back; the
    same write is then made with public calls, and the batched path stays off for the process."""
    monkeypatch.setattr(study_mod, "_RDB_BROKEN", [])

    def changed(*args, **kwargs):
        raise TypeError("insert_params() got an unexpected keyword argument")

    monkeypatch.setattr(study_mod._RDB, "insert_params", changed)
    old, new = both("tpe", f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}")
    assert old == new
    assert study_mod._RDB_BROKEN and study_mod._rdb(open_study(f"sqlite:///{tmp_path / 'new.db'}", "new",
                                                                OBJECTIVES)._storage) is None


def _write_transactions(study: optuna.Study) -> list[int]:
    """A counter of committed transactions that wrote something, on the study's SQLite engine."""
    from sqlalchemy import event

    engine = study._storage._backend.engine
    count, dirty = [0], [False]

    @event.listens_for(engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, *args) -> None:
        if statement.lstrip().split(" ", 1)[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            dirty[0] = True

    @event.listens_for(engine, "commit")
    def _commit(conn) -> None:
        if dirty[0]:
            count[0] += 1
        dirty[0] = False

    return count


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2"])
def test_one_write_transaction_per_asked_trial_and_per_tell(name, tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 'c.db'}", "s", OBJECTIVES)
    opt = Optimizer(study, space_of(name), name=name, seed=0, options=CHEAP[name])
    writes = _write_transactions(study)
    for n in (1, 3, 2):
        before = writes[0]
        trials = opt.ask(n)
        assert writes[0] - before == n  # the QMC position and NSGA-II's bookkeeping ride along
        before = writes[0]
        for t in trials:
            opt.tell(t.number, zdt1(t.params), attrs={"plan": {"w": 1}, "worker": "w", "timings": {}, "attempts": 1})
        assert writes[0] - before == n
    stored = study.get_trials(deepcopy=False)
    assert all(t.state == TrialState.COMPLETE and t.user_attrs["driver"] == DRIVER_ID for t in stored)
    assert all(set(t.params) == set(space_of(name)) and t.user_attrs["plan"] == {"w": 1} for t in stored)


def test_asked_trials_are_what_the_storage_returns(tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 'r.db'}", "s", OBJECTIVES)
    opt = Optimizer(study, space_of("tpe"), name="tpe", seed=0, options=CHEAP["tpe"])
    opt.enqueue({"k": 3}, {"initial": True})
    asked = opt.ask(3)
    stored = {t.number: t for t in open_study(f"sqlite:///{tmp_path / 'r.db'}", "s", OBJECTIVES).trials}
    for t in asked:
        s = stored[t.number]
        assert (t._trial_id, t.state, t.params, t.distributions, t.user_attrs) == \
               (s._trial_id, s.state, s.params, s.distributions, s.user_attrs)
        assert all(type(t.params[k]) is type(s.params[k]) for k in t.params)  # int stays int, not numpy
    assert asked[0].user_attrs["initial"] is True and asked[0].params["k"] == 3


def test_incompatible_stored_distribution_is_refused(tmp_path):
    from mergesearch.errors import ConfigError

    url = f"sqlite:///{tmp_path / 'd.db'}"
    opt = Optimizer(open_study(url, "s", OBJECTIVES), space_of("random"), name="random", seed=0, options={})
    opt.tell(opt.ask(1)[0].number, [0.0, 1.0])
    other = {**space_of("random"), "c": IntDistribution(0, 3)}  # stored as categorical
    with pytest.raises(ConfigError, match="parameter 'c'"):
        Optimizer(open_study(url, "s", OBJECTIVES), other, name="random", seed=0, options={}).ask(1)


def test_orphan_popped_before_its_params_were_written_keeps_its_enqueued_params(tmp_path):
    """A driver stopped between taking an enqueued trial (RUNNING) and writing its params left the params only in
    the trial's ``fixed_params``: the re-run gets them back."""
    from mergesearch.search.study import recover_orphans

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = open_study(url, "s", OBJECTIVES)
    point = {"x0": 0.5, "x1": 0.25, "x2": 0.0, "x3": 1.0, "lr": 1e-3, "k": 2, "c": "b"}
    study.enqueue_trial(point, user_attrs={"initial": True})
    (waiting,) = study.get_trials(deepcopy=False)
    study._storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)  # popped, then the driver died
    assert recover_orphans(study) == 1
    rerun = Optimizer(open_study(url, "s", OBJECTIVES), space_of("tpe"), name="tpe", seed=0, options={}).ask(1)[0]
    assert rerun.params == point and rerun.user_attrs["initial"] is True and rerun.user_attrs["rerun_of"] == 0
