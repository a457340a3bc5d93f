"""Studies in Optuna storage: open or create, check objectives, the driver lease, orphan recovery.

Storage URLs: None → ``sqlite:///<study_name>.db`` in the working directory; any SQLAlchemy URL
(``sqlite:///``, ``postgresql://``, ``mysql+pymysql://``); an Optuna journal file as ``journal:///abs/path.log``,
``journal://rel/path.log`` or any path ending ``.log``; ``memory://`` for an in-memory study (no resume).
``optuna-dashboard <url>`` opens the same storage (for a journal file: ``optuna-dashboard path.log``).

Orphans. Trials created by :class:`~mergesearch.search.optimizers.Optimizer` carry the user attr ``driver``
(this process's :data:`DRIVER_ID`). One driver runs a study at a time (:class:`DriverLease`, refreshed by a
thread while it runs; a second driver is refused): so once a driver holds the lease, every RUNNING trial it did
not create was left by a stopped driver, and :func:`recover_orphans` fails and re-enqueues it. One mechanism for
every storage — no per-trial heartbeats to write.

Writes. A trial reaches the storage in two transactions: created whole when asked (:func:`create_trial`: params,
attrs, the sampler's notes) and finished whole when told (:func:`finish_trial`: the result's attrs, values,
state) — on a SQL database a few multi-row statements each, instead of one transaction per field.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import re
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import ConfigError, StudyError

#: identifies this driver process in the trials it creates (user attr ``driver``)
DRIVER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
ORPHAN_REASON = "orphaned (driver stopped)"

_DIRECTIONS = ("minimize", "maximize")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (``postgresql://u:***@host/db``)."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def _password(url: str) -> str | None:
    m = re.search(r"://[^/:@]*:([^@/]*)@", url)
    return m.group(1) if m and m.group(1) else None


#: the study name when neither the command line nor the job names one
DEFAULT_STUDY = "mergesearch"


def storage_url(value: str) -> str:
    """A storage URL from what a user typed: a plain file path (``demo.db``, ``runs/x.sqlite``) is a SQLite file
    (made absolute), a path ending ``.log`` a journal file; URLs (``scheme://...``) are kept as they are."""
    if "://" in value or value.endswith(".log"):
        return value
    return f"sqlite:///{os.path.abspath(value)}"


def study_location(config: Any = None, storage: str | None = None, study: str | None = None) -> tuple[str, str]:
    """``(storage URL, study name)``: the command line's values, else the job's, else ``run``'s defaults
    (study :data:`DEFAULT_STUDY`, storage ``sqlite:///<study>.db`` in the working directory)."""
    name = study or (config.study if config is not None else None) or DEFAULT_STUDY
    url = storage or (config.storage if config is not None else None) or f"sqlite:///{name}.db"
    if os.environ.get(RAY_JOB_ENV) and _relative_file(url):
        # `ray job submit` runs the driver in a temporary copy of --working-dir, gone when the cluster restarts
        raise ConfigError(f"storage {mask_url(url)} is a relative path, and under `ray job submit` the working "
                          "directory is Ray's temporary copy (lost on restart): pass an absolute one, e.g. "
                          f"--storage sqlite:////abs/path/{name}.db")
    return storage_url(url), name


#: set by Ray's job supervisor in the environment of a driver started by `ray job submit`
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _relative_file(url: str) -> bool:
    """Whether ``url`` names a local file (SQLite, journal, plain path) by a relative path."""
    for prefix in ("sqlite:///", "journal://"):
        if url.startswith(prefix):
            return not url[len(prefix):].startswith("/")
    return "://" not in url and not os.path.isabs(url)


def _make_storage(url: str) -> BaseStorage:
    url = storage_url(url)
    if url == "memory://":
        return optuna.storages.InMemoryStorage()
    if url.startswith("journal://") or ("://" not in url and url.endswith(".log")):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal://") :] if url.startswith("journal://") else url
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise StudyError(f"cannot open storage {mask_url(url)}: directory {parent} does not exist")
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError as e:  # the URL's database driver is not installed
        if url.split("://", 1)[0] in ("postgresql", "postgresql+psycopg"):
            why = 'the PostgreSQL driver psycopg is not installed; pip install "mergesearch[postgres]"'
        else:
            cause = e.__cause__ or e
            why = f"its database driver is not installed ({type(cause).__name__}: {cause})"
        raise StudyError(f"cannot open storage {mask_url(url)}: {why}") from None
    return storage


def _objectives_str(names: Sequence[str], directions: Sequence[str]) -> str:
    return "[" + ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=False)) + "]"


def open_study(
    storage: str | None,
    study_name: str,
    objectives: list[tuple[str, str]],
    *,
    config_fingerprint: str | None = None,
    meaning: Mapping[str, Any] | None = None,
    create: bool = True,
    new: bool = False,
) -> optuna.Study:
    """Open (or create) a study whose objectives must be exactly ``objectives``.

    Args:
        storage: storage URL (see the module docstring) or None for ``sqlite:///<study_name>.db``.
        study_name: the study's name in the storage.
        objectives: (name, direction) per objective, direction ``minimize`` or ``maximize``.
        config_fingerprint: stored in the new study's user attrs (``config_fingerprint``).
        meaning: what gives the trials their meaning (a JSON-ready dict, e.g. models, dtype, space, objectives
            and their data); stored in a new study (``job_meaning``); :func:`check_meaning` compares it.
        create: create the study when absent (else StudyError).
        new: the study must not exist yet (else StudyError).

    Returns:
        The study; its sampler is a placeholder, set by :class:`~mergesearch.search.optimizers.Optimizer`.
        A study created here carries the user attr ``created_by`` = :data:`DRIVER_ID`.
    """
    if not objectives:
        raise ConfigError("at least one objective is needed")
    names = [n for n, _ in objectives]
    directions = [d for _, d in objectives]
    bad = [d for d in directions if d not in _DIRECTIONS]
    if bad:
        raise ConfigError(f"objective direction must be minimize or maximize, got {bad[0]!r}")
    url = storage_url(storage or f"sqlite:///{study_name}.db")
    try:
        st = _make_storage(url)
        existing = {s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)}
    except StudyError:
        raise
    except Exception as e:  # sqlalchemy / driver / OS errors: one line naming the URL, password masked
        msg = str(e).splitlines()[0] if str(e) else ""
        pw = _password(url)
        if pw:
            msg = msg.replace(pw, "***")
        raise StudyError(f"cannot open storage {mask_url(url)}: {type(e).__name__}: {msg}") from None
    sampler = optuna.samplers.RandomSampler()
    if study_name in existing and new:
        raise StudyError(f"study {study_name!r} already exists in {mask_url(url)}; choose another name")
    if study_name in existing:
        study = optuna.load_study(study_name=study_name, storage=st, sampler=sampler)
        stored_dirs = [d.name.lower() for d in study.directions]
        # a study made by plain Optuna may have no names: then only the directions must match
        stored_names = list(study.user_attrs.get("objective_names") or study.metric_names or names)
        if stored_dirs != directions or stored_names != names:
            raise StudyError(
                f"study {study_name!r} in {mask_url(url)} has objectives "
                f"{_objectives_str(stored_names, stored_dirs)}, the config has {_objectives_str(names, directions)}"
            )
        return study
    if not create:
        known = ", ".join(sorted(existing)) or "none"
        raise StudyError(f"no study {study_name!r} in {mask_url(url)}; studies there: {known}")
    study = optuna.create_study(storage=st, study_name=study_name, directions=directions, sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
    study.set_user_attr("objective_names", names)
    study.set_user_attr("objective_directions", directions)
    if config_fingerprint is not None:
        study.set_user_attr("config_fingerprint", config_fingerprint)
    if meaning is not None:
        study.set_user_attr(MEANING_ATTR, dict(meaning))
    study.set_user_attr("created_by", DRIVER_ID)
    return study


#: study user attr: what gives the study's trials their meaning (see :func:`open_study`)
MEANING_ATTR = "job_meaning"


def first_difference(stored: Any, new: Any, path: str = "") -> str | None:
    """The first place where two JSON-like values differ, as ``path: <stored> in the study, <new> in the job``
    (dict keys in order, then list items); None when equal.

    A key only ``new`` has is not a difference: it is a setting added by a later release, which the stored
    job ran with at its default.
    """
    if isinstance(stored, Mapping) and isinstance(new, Mapping):
        for key in stored:
            where = f"{path}.{key}" if path else str(key)
            if key not in new:
                return f"{where}: {stored[key]!r} in the study, absent in the job"
            diff = first_difference(stored[key], new[key], where)
            if diff:
                return diff
        return None
    if isinstance(stored, list) and isinstance(new, list):
        for i, (a, b) in enumerate(zip(stored, new, strict=False)):
            diff = first_difference(a, b, f"{path}[{i}]")
            if diff:
                return diff
        if len(stored) != len(new):
            return f"{path}: {len(stored)} entries in the study, {len(new)} in the job"
        return None
    return None if stored == new else f"{path or '<job>'}: {stored!r} in the study, {new!r} in the job"


def check_meaning(study: optuna.Study, url: str, meaning: Mapping[str, Any] | None, fingerprint: str | None) -> None:
    """Refuse (StudyError naming the first difference) a job that would give the stored trials of ``study``
    another meaning; studies stored before ``job_meaning`` existed are compared by ``config_fingerprint``."""
    stored = study.user_attrs.get(MEANING_ATTR)
    if meaning is not None and stored is not None:
        diff = first_difference(stored, dict(meaning))
    elif fingerprint is not None and study.user_attrs.get("config_fingerprint") not in (None, fingerprint):
        diff = "models or space (config fingerprint)"
    else:
        return
    if diff:
        raise StudyError(f"study '{study.study_name}' in {mask_url(url)} was run with another job: {diff}; "
                         "resuming would mix the two in one study (use --new-study NAME)")


def list_studies(storage: str) -> list[dict[str, Any]]:
    """Every study in an existing storage: ``name``, ``objectives`` [(name, direction)], trial ``counts`` by
    state (``complete``, ``failed``, ``running``, ``waiting``, ``total``), ``created`` (ISO time or None).

    Raises:
        StudyError: the storage cannot be opened or its file does not exist (nothing is created).
    """
    from mergesearch.search.pareto import open_storage

    st = open_storage(storage)
    out = []
    for summary in optuna.get_all_study_summaries(st, include_best_trial=False):
        dirs = [d.name.lower() for d in summary.directions]
        names = summary.user_attrs.get("objective_names") or [f"obj{i}" for i in range(len(dirs))]
        states = [t.state for t in st.get_all_trials(summary._study_id, deepcopy=False)]
        counts = {k: states.count(s) for k, s in (("complete", TrialState.COMPLETE), ("failed", TrialState.FAIL),
                                                   ("running", TrialState.RUNNING), ("waiting", TrialState.WAITING))}
        counts["total"] = len(states)
        created = summary.datetime_start.isoformat(timespec="seconds") if summary.datetime_start else None
        out.append({"name": summary.study_name, "objectives": list(zip(names, dirs, strict=False)),
                    "counts": counts, "created": created})
    return sorted(out, key=lambda s: s["name"])


def _trial_id(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def set_trial_attrs(study: optuna.Study, trial_number: int, attrs: Mapping[str, Any]) -> None:
    """Set user attrs of a trial by number (the trial must not be finished yet)."""
    tid = _trial_id(study, trial_number)
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(tid, key, value)


# --- batched writes --------------------------------------------------------------------------------------
# Optuna's public storage API commits once per call (a parameter, an attr, the state), and its SQL storage runs
# two or three statements per parameter even inside one transaction; with SQLite on disk every commit is also an
# fsync. The driver instead writes a trial in two transactions — created whole (params, attrs) when asked,
# finished whole (result attrs, values, state) when told — with a few multi-row statements each, on Optuna's own
# tables. That schema is Optuna's (stable, versioned by its alembic migrations, read by optuna-dashboard) but the
# session helper and ORM models are private: every use is checked first and falls back to the public calls.

#: why optuna's private SQL storage helpers failed in this process (then public calls are used from there on)
_RDB_BROKEN: list[str] = []


class _RDB:
    """What the batched SQL path uses of optuna's private RDB storage: the backend, its ORM models, its
    session context manager (commit, rollback, errors as ``StorageInternalError``) and sqlalchemy."""

    def __init__(self, backend: Any, models: Any, session_of: Any, sa: Any) -> None:
        self.backend, self.models, self.session_of, self.sa = backend, models, session_of, sa

    def session(self) -> Any:
        return self.session_of(self.backend.scoped_session)

    def replace_attrs(self, session: Any, model: Any, owner: str, owner_id: int, attrs: Mapping[str, Any],
                      *, new: bool = False) -> None:
        """Set ``attrs`` (key -> JSON value) of one trial or study: two statements whatever their number (one for
        a ``new`` trial, which has no attrs to replace)."""
        if not attrs:
            return
        table = model.__table__
        if not new:
            session.execute(self.sa.delete(table).where(table.c[owner] == owner_id, table.c.key.in_(list(attrs))))
        session.execute(self.sa.insert(table), [{owner: owner_id, "key": k, "value_json": json.dumps(v)}
                                                for k, v in attrs.items()])

    def insert_params(self, session: Any, trial_id: int, params: Mapping[str, Any],
                      distributions: Mapping[str, BaseDistribution]) -> None:
        if not params:
            return
        rows = [{"trial_id": trial_id, "param_name": name, "param_value": distributions[name].to_internal_repr(v),
                 "distribution_json": optuna.distributions.distribution_to_json(distributions[name])}
                for name, v in params.items()]
        session.execute(self.sa.insert(self.models.TrialParamModel.__table__), rows)


def _rdb(storage: BaseStorage) -> _RDB | None:
    """The batched SQL path for ``storage`` when it is an optuna RDB storage whose private parts are as expected;
    None otherwise (in-memory, journal, a changed optuna)."""
    if _RDB_BROKEN:
        return None
    backend = getattr(storage, "_backend", storage)  # optuna wraps RDBStorage in _CachedStorage
    if not isinstance(backend, optuna.storages.RDBStorage) or not hasattr(backend, "scoped_session"):
        return None
    try:
        import sqlalchemy as sa
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
    except ImportError:
        return None
    # (model, methods used, columns written): optuna's schema as the batched statements expect it
    needed = {"StudyModel": (("find_or_raise_by_id",), ()),
              "TrialModel": (("find_or_raise_by_id", "count_past_trials"), ()),
              "TrialValueModel": (("value_to_stored_repr",), ("trial_id", "objective", "value", "value_type")),
              "TrialParamModel": ((), ("trial_id", "param_name", "param_value", "distribution_json")),
              "TrialUserAttributeModel": ((), ("trial_id", "key", "value_json")),
              "TrialSystemAttributeModel": ((), ("trial_id", "key", "value_json")),
              "StudySystemAttributeModel": ((), ("study_id", "key", "value_json"))}
    for name, (methods, columns) in needed.items():
        model = getattr(models, name, None)
        table = getattr(model, "__table__", None)
        if model is None or table is None or not all(hasattr(model, m) for m in methods) \
                or not all(c in table.c for c in columns):
            return None
    return _RDB(backend, models, _create_scoped_session, sa)


def _private_failed(exc: BaseException) -> None:
    """Give up optuna's private RDB path for this process (the transaction was rolled back: nothing written)."""
    _RDB_BROKEN.append(f"{type(exc).__name__}: {exc}")
    optuna.logging.get_logger(__name__).warning(
        "batched storage writes unavailable with this optuna (%s); writing field by field", _RDB_BROKEN[0])


#: what a change in optuna's private parts raises inside the batched path (the session rolls back on it)
_DRIFT = (AttributeError, TypeError)


def create_trial(storage: BaseStorage, study_id: int, trial: FrozenTrial,
                 study_system_attrs: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Create ``trial`` (RUNNING, sampled in memory: params, distributions, user and system attrs) in the study,
    with ``study_system_attrs`` (what the sampler noted on the study meanwhile, e.g. a QMC position).

    One transaction on a SQL database, taking the same study lock optuna takes to number a trial; elsewhere
    ``storage.create_new_trial(template_trial=...)``. The caller checks the distributions against the stored
    ones (the batched path does not re-query them per parameter).

    Returns:
        ``(trial_id, number)``.
    """
    rdb = _rdb(storage)
    if rdb is not None:
        m = rdb.models
        try:
            for attempt in range(5):
                try:
                    with rdb.session() as session:
                        m.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                        row = m.TrialModel(study_id=study_id, number=None, state=TrialState.RUNNING,
                                           datetime_start=trial.datetime_start)
                        session.add(row)
                        session.flush()
                        row.number = row.count_past_trials(session)
                        rdb.insert_params(session, row.trial_id, trial.params, trial.distributions)
                        rdb.replace_attrs(session, m.TrialUserAttributeModel, "trial_id", row.trial_id,
                                          trial.user_attrs, new=True)
                        rdb.replace_attrs(session, m.TrialSystemAttributeModel, "trial_id", row.trial_id,
                                          trial.system_attrs, new=True)
                        rdb.replace_attrs(session, m.StudySystemAttributeModel, "study_id", study_id,
                                          study_system_attrs or {})
                        ids = row.trial_id, row.number
                    return ids
                except optuna.exceptions.StorageInternalError:
                    # as optuna's own trial creation: a deadlock between database clients is retried
                    if attempt == 4:
                        raise
                    time.sleep(random.random() * 2.0)
        except _DRIFT as e:
            _private_failed(e)
    for key, value in (study_system_attrs or {}).items():
        storage.set_study_system_attr(study_id, key, value)
    trial_id = storage.create_new_trial(study_id, template_trial=trial)
    return trial_id, storage.get_trial_number_from_id(trial_id)


@contextlib.contextmanager
def _updatable_trial(rdb: Any, trial_id: int, user_attrs: Mapping[str, Any]) -> Iterator[tuple[Any, Any]]:
    """One transaction on an unfinished trial's row (locked for update), its ``user_attrs`` replaced first:
    yields (session, trial row); committed when the block ends.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: the trial is already finished (nothing is written).
    """
    with rdb.session() as session:
        row = rdb.models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        rdb.backend.check_trial_is_updatable(trial_id, row.state)
        rdb.replace_attrs(session, rdb.models.TrialUserAttributeModel, "trial_id", trial_id, user_attrs)
        yield session, row


def store_sampled(storage: BaseStorage, study_id: int, trial_id: int, params: Mapping[str, Any],
                  distributions: Mapping[str, BaseDistribution], user_attrs: Mapping[str, Any],
                  system_attrs: Mapping[str, Any], study_system_attrs: Mapping[str, Any] | None = None) -> None:
    """Write new params and attrs onto an unfinished stored trial (a WAITING trial just set RUNNING, sampled in
    memory), with ``study_system_attrs``: one transaction on a SQL database, one call per field elsewhere."""
    rdb = _rdb(storage)
    if rdb is not None:
        m = rdb.models
        try:
            with _updatable_trial(rdb, trial_id, user_attrs) as (session, _):
                rdb.insert_params(session, trial_id, params, distributions)
                rdb.replace_attrs(session, m.TrialSystemAttributeModel, "trial_id", trial_id, system_attrs)
                rdb.replace_attrs(session, m.StudySystemAttributeModel, "study_id", study_id, study_system_attrs or {})
            return
        except _DRIFT as e:
            _private_failed(e)
    for key, value in (study_system_attrs or {}).items():
        storage.set_study_system_attr(study_id, key, value)
    for name, value in params.items():
        dist = distributions[name]
        storage.set_trial_param(trial_id, name, dist.to_internal_repr(value), dist)
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in system_attrs.items():
        storage.set_trial_system_attr(trial_id, key, value)


def finish_trial(storage: BaseStorage, trial_id: int, state: TrialState, values: Sequence[float] | None,
                 user_attrs: Mapping[str, Any]) -> None:
    """Store ``user_attrs`` on a RUNNING trial and finish it (``state``, with ``values`` when COMPLETE): one
    transaction on a SQL database (attrs and result land together or not at all), one call per field elsewhere.

    Raises:
        optuna.exceptions.UpdateFinishedTrialError: the trial is already finished (nothing is written).
    """
    rdb = _rdb(storage)
    if rdb is not None:
        m = rdb.models
        try:
            with _updatable_trial(rdb, trial_id, user_attrs) as (session, row):
                if values is not None:
                    table = m.TrialValueModel.__table__
                    session.execute(rdb.sa.delete(table).where(table.c.trial_id == trial_id))
                    rows = []
                    for objective, value in enumerate(values):
                        stored, kind = m.TrialValueModel.value_to_stored_repr(float(value))
                        rows.append({"trial_id": trial_id, "objective": objective, "value": stored,
                                     "value_type": kind})
                    session.execute(rdb.sa.insert(table), rows)
                # as RDBStorage.set_trial_state_values does for a finished state
                row.state = state
                row.datetime_complete = datetime.datetime.now()
            return
        except _DRIFT as e:
            _private_failed(e)
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    storage.set_trial_state_values(trial_id, state, values)


def trial_record(*, spec: dict, worker: str, timings: dict, attempts: int, summary: str = "") -> dict[str, Any]:
    """The user attrs a finished trial stores: its candidate (see :mod:`mergesearch.candidates`: its plan, its
    ``family`` and, for a family beyond a static merge, the rest of its spec under ``candidate``), its one-line
    summary, worker, timings (seconds by phase) and attempts. Given to ``Optimizer.tell(..., attrs=)``."""
    spec = dict(spec)
    attrs = {"plan": spec.pop("plan"), "family": spec.pop("family", "static")}
    if spec:
        attrs["candidate"] = spec
    return {**attrs, "summary": summary, "worker": worker, "timings": timings, "attempts": attempts}


def record_trial(study: optuna.Study, trial_number: int, **record: Any) -> None:
    """Store :func:`trial_record` ``(**record)`` on a running trial (call before tell)."""
    set_trial_attrs(study, trial_number, trial_record(**record))


def count_complete(study: optuna.Study) -> int:
    """Number of COMPLETE trials."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _driver_gone(driver: str | None) -> bool:
    """True if ``driver`` (a DRIVER_ID) ran on this host and its process no longer exists."""
    if not driver or driver == DRIVER_ID:
        return False
    parts = driver.rsplit(":", 2)  # host:pid:random
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False  # alive under another user, or not a pid: leave it to the lease's staleness
    return False


#: user attrs a re-run of a trial keeps (what it was enqueued as)
CARRIED_ATTRS = ("initial", "refine_of")


def carried_attrs(user_attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`CARRIED_ATTRS` among ``user_attrs``."""
    return {k: user_attrs[k] for k in CARRIED_ATTRS if k in user_attrs}


def recover_orphans(study: optuna.Study) -> int:
    """Fail trials left RUNNING by a stopped driver and re-enqueue their params so they run again.

    Call it holding the study's :class:`DriverLease` (no other driver is live): every RUNNING trial not created
    by this process is then an orphan. Each gets user attr ``fail_reason`` = ``ORPHAN_REASON``.

    Returns:
        The number of trials recovered.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    orphans = [t for t in running if t.user_attrs.get("driver") != DRIVER_ID]
    n = 0
    for t in orphans:
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", ORPHAN_REASON)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # finished meanwhile (its driver was alive after all, or another recovery won)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        # a trial stopped between being popped from the queue and its params being written keeps the enqueued
        # (fixed) params only in its system attrs
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}
        study.enqueue_trial(params, user_attrs={"rerun_of": t.number, **carried_attrs(t.user_attrs)})
        n += 1
    return n


class _Periodic:
    """A daemon thread calling :meth:`tick` every ``interval`` seconds between :meth:`start` and :meth:`stop`."""

    interval: float

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One period's work; return False to end the thread."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.tick() is False:
                    return
            except Exception:  # a transient storage error must not kill the thread; the next tick retries
                optuna.logging.get_logger(__name__).warning("%s failed; retrying", type(self).__name__)

    def start(self) -> _Periodic:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        """Whether the thread is started (between :meth:`start` and :meth:`stop`)."""
        return self._thread is not None


LEASE_ATTR = "driver_lease"
#: "no such attr" (a lease attr's value may be anything JSON, None included)
_ABSENT = object()
LEASE_INTERVAL = 5.0  # seconds between refreshes of a running driver's lease
LEASE_STALE = 60.0  # a lease not refreshed for this long belongs to a driver that is gone


class DriverLease(_Periodic):
    """One driver per study: the study user attr ``driver_lease`` = ``{"owner": DRIVER_ID, "time": unix s}``.

    :meth:`acquire` refuses a study whose lease another driver refreshed less than ``stale_after`` seconds ago
    (unless that driver ran on this host and its process is gone: a killed driver is taken over at once). While
    the run works, a thread refreshes the lease every ``interval`` seconds and notes in :attr:`lost` the new
    owner if another driver took it over (two drivers started in the same instant: the last writer wins,
    the other stops).

    A run that fails before it wrote anything else hands the lease back with :meth:`give_back`, which restores
    the value :meth:`acquire` found (the study as it was, logically: a SQLite file's header still counts the
    writes); a run that worked marks it free with :meth:`release`.
    """

    def __init__(self, study: Any, *, interval: float = LEASE_INTERVAL, stale_after: float = LEASE_STALE) -> None:
        super().__init__()
        self.study = study
        self.interval = interval
        self.stale_after = stale_after
        self.lost: str | None = None
        #: this driver holds the lease (acquired, not yet released or given back)
        self.held = False
        # the study attr as acquire() found it (_ABSENT: not set), for give_back()
        self._before: Any = _ABSENT

    def _raw(self) -> Any:
        return self.study._storage.get_study_user_attrs(self.study._study_id).get(LEASE_ATTR, _ABSENT)

    def _read(self) -> dict[str, Any]:
        raw = self._raw()
        return raw if isinstance(raw, dict) else {}

    def _write(self, released: bool = False) -> None:
        self.study.set_user_attr(LEASE_ATTR, {"owner": DRIVER_ID, "time": time.time(), "released": released})

    def check(self) -> None:
        """Raise StudyError naming the live driver that holds the lease, if another one does (reads only)."""
        lease = self._read()
        owner, age = lease.get("owner"), max(0.0, time.time() - float(lease.get("time", 0.0)))
        if owner and owner != DRIVER_ID and not lease.get("released") and age < self.stale_after \
                and not _driver_gone(owner):
            raise StudyError(f"study '{self.study.study_name}' is being run by another driver "
                             f"({owner.rsplit(':', 1)[0]}, seen {age:.0f}s ago); stop it first, or wait "
                             f"{self.stale_after:.0f}s if it was killed")

    def acquire(self) -> None:
        """Take the lease, or raise StudyError naming the live driver that holds it."""
        before = self._raw()
        self.check()
        self._write()
        if not self.held:
            self._before = before
        self.held = True
        self.lost = None

    def tick(self) -> bool:
        """Refresh the lease; note in :attr:`lost` (and stop) when another driver took it over."""
        owner = self._read().get("owner")
        if owner != DRIVER_ID:
            self.lost = str(owner)
            return False
        self._write()
        return True

    def release(self) -> None:
        """Mark the lease free (a clean stop); a lease lost to another driver is left alone."""
        self.held = False
        try:
            if self.lost is None and self._read().get("owner") == DRIVER_ID:
                self._write(released=True)
        except Exception:  # the study stays usable: a stale lease is taken over after stale_after seconds
            pass

    def give_back(self) -> None:
        """Stop refreshing and put the lease attr back as :meth:`acquire` found it (deleted if it was absent),
        for a run that stops before writing anything else; a lease lost to another driver is left alone."""
        self.stop()
        if not self.held:
            return
        self.held = False
        try:
            if self.lost is not None or self._read().get("owner") != DRIVER_ID:
                return
            if self._before is not _ABSENT:
                self.study.set_user_attr(LEASE_ATTR, self._before)
            elif not _delete_study_user_attr(self.study, LEASE_ATTR):
                self._write(released=True)  # a storage that cannot delete an attr: free, at least
        except Exception:  # as release(): a lease left behind goes stale after stale_after seconds
            pass


def _delete_study_user_attr(study: optuna.Study, key: str) -> bool:
    """Delete a study user attr (Optuna has no API for it); True when done. Only for SQL storages, whose
    schema has kept the table ``study_user_attributes`` since Optuna 1.x; False for the others."""
    storage = getattr(study._storage, "_backend", study._storage)  # through optuna's caching wrapper
    engine = getattr(storage, "engine", None)
    if not isinstance(storage, optuna.storages.RDBStorage) or engine is None:
        return False
    import sqlalchemy

    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM study_user_attributes WHERE study_id = :sid AND key = :key"),
                     {"sid": study._study_id, "key": key})
    return True
