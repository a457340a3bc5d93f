"""The Pareto front of a study: non-dominated trials, hypervolume, and their table/JSON/CSV renderings.

Non-dominated sorting is Optuna's (``study.best_trials``: COMPLETE trials only, infeasible ones excluded when
any trial carries constraints) and pymoo's; the hypervolume is pymoo's ``HV`` (moocore). Objective values are
kept in the user's units everywhere; only inside :func:`hypervolume` are maximised objectives negated so that
every objective is minimised.

Reference point: the one stored with the study (``hv_reference``, see :mod:`mergesearch.search.baselines`:
the base model's scores and, for costs, the worst expert's, or ``search.reference_point``), so every ``front``
of a study and its run's progress line measure against the same point; with it, the hypervolume is also given
normalised to [0, 1] by the box between that point and the best reference row. A study without one (not run by
mergesearch, or with ``search.baselines: false``) uses the *nadir* of the completed trials — the worst value
of each objective over all completed feasible trials with finite values — moved a further 10 % of that
objective's range in the worse direction (10 % of ``max(|nadir|, 1)`` when the range is zero, e.g. one trial),
so that the extreme points of the front still contribute volume.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergesearch.errors import ConfigError, StudyError

if TYPE_CHECKING:
    import optuna
    from rich.table import Table

#: Fraction of an objective's range added beyond the nadir for the default reference point.
REFERENCE_MARGIN = 0.1

ReferencePoint = Mapping[str, float] | Sequence[float] | None


@dataclass
class FrontTrial:
    """One non-dominated trial: its number, objective values by name, params, plan and summary."""

    number: int
    values: dict[str, float]
    params: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    summary: str = ""
    #: held-out (test split) scores by objective name, when the front was re-checked.
    test_values: dict[str, float] | None = None
    #: where the trial came from, when not the optimizer: ``recipe`` (``search.initial``) or ``refines #n``.
    origin: str = ""
    #: the candidate family (:mod:`mergesearch.candidates`): ``static`` or ``twin``.
    family: str = "static"


@dataclass
class Front:
    """The Pareto front of a study.

    Attributes:
        objectives: ``(name, direction)`` per objective, in the study's order; direction is
            ``"maximize"`` or ``"minimize"``.
        trials: the non-dominated feasible COMPLETE trials, sorted by the first objective (best first).
        counts: trial counts by state: ``complete``, ``failed``, ``running``, ``pruned``, ``total``; and
            ``examples``: examples scored by all trials (see :mod:`mergesearch.search.fidelity`).
        hypervolume: hypervolume of the front w.r.t. ``reference_point``.
        reference_point: objective name → reference value (user units).
        all_values: ``(n, m)`` values of every completed feasible trial with finite values (for plots).
        study_name: the study's name ("" for a front built from bare values).
    """

    objectives: list[tuple[str, str]]
    trials: list[FrontTrial]
    counts: dict[str, int]
    hypervolume: float
    reference_point: dict[str, float]
    all_values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    study_name: str = ""
    #: the hypervolume in [0, 1] (see :func:`normalised_hypervolume`), when the study stores an ideal point.
    normalised_hypervolume: float | None = None
    #: reference rows (base, each expert, uniform average): name → values by objective; never front trials.
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    #: where the reference point comes from: ``baselines``, ``config``, ``given`` (argument) or ``nadir``.
    reference_source: str = "nadir"
    #: ``(trial number, plan summary)`` per row of ``all_values`` (empty for a front built from bare values).
    all_info: list[tuple[int, str]] = field(default_factory=list)

    def dominating(self, values: Mapping[str, float]) -> list[int]:
        """Numbers of the front trials that strictly dominate ``values`` (no worse anywhere, better somewhere)."""
        signs = _signs(self.directions)
        target = np.array([values[n] for n in self.names]) * signs
        out = []
        for t in self.trials:
            v = np.array([t.values[n] for n in self.names]) * signs
            if np.all(v <= target) and np.any(v < target):
                out.append(t.number)
        return out

    @property
    def names(self) -> list[str]:
        """Objective names in order."""
        return [n for n, _ in self.objectives]

    @property
    def directions(self) -> list[str]:
        """Objective directions in order."""
        return [d for _, d in self.objectives]

    def values(self) -> np.ndarray:
        """The front's objective values, shape ``(len(trials), m)``, user units."""
        return np.array([[t.values[n] for n in self.names] for t in self.trials], dtype=float).reshape(
            len(self.trials), len(self.objectives))

    @classmethod
    def from_values(cls, values: np.ndarray, objectives: Sequence[tuple[str, str]],
                    reference_point: ReferencePoint = None) -> Front:
        """A front of the non-dominated rows of ``values`` (``(n, m)``, user units); numbers are row indices."""
        objectives = [(n, _direction(d)) for n, d in objectives]
        values = np.asarray(values, dtype=float).reshape(-1, len(objectives))
        dirs = [d for _, d in objectives]
        ref = (resolve_reference_point(values, objectives, reference_point) if len(values)
               else np.full(len(objectives), np.nan))
        idx = non_dominated(values, dirs)
        trials = [FrontTrial(int(i), {n: float(values[i, j]) for j, (n, _) in enumerate(objectives)})
                  for i in idx]
        trials.sort(key=lambda t: _sort_key(t, objectives))
        counts = {"complete": len(values), "failed": 0, "running": 0, "total": len(values)}
        ref_by_name = dict(zip([n for n, _ in objectives], map(float, ref), strict=True))
        return cls(objectives, trials, counts, hypervolume(values[idx], dirs, ref), ref_by_name, values)


def _direction(d: Any) -> str:
    """``"maximize"``/``"minimize"`` from a string or an ``optuna.study.StudyDirection``."""
    name = str(getattr(d, "name", d)).lower()
    if name not in ("maximize", "minimize"):
        raise ConfigError(f"objective direction must be 'maximize' or 'minimize', got {d!r}")
    return name


def _signs(directions: Sequence[Any]) -> np.ndarray:
    """+1 for minimised, -1 for maximised objectives: ``values * signs`` is to be minimised."""
    return np.array([-1.0 if _direction(d) == "maximize" else 1.0 for d in directions])


def _sort_key(t: FrontTrial, objectives: Sequence[tuple[str, str]]) -> tuple[float, int]:
    name, d = objectives[0]
    return (-t.values[name] if d == "maximize" else t.values[name], t.number)


def non_dominated(values: np.ndarray, directions: Sequence[Any]) -> np.ndarray:
    """Indices of the non-dominated rows of ``values`` (``(n, m)``, user units), via pymoo's sorting."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return np.zeros(0, dtype=int)
    idx = NonDominatedSorting().do(values * _signs(directions), only_non_dominated_front=True)
    return np.sort(np.asarray(idx, dtype=int))


def hypervolume(values: np.ndarray, directions: Sequence[Any], reference_point: Sequence[float]) -> float:
    """Hypervolume dominated by ``values`` and bounded by ``reference_point`` (pymoo ``HV``).

    Args:
        values: ``(n, m)`` objective values in user units (dominated rows are allowed and add nothing).
        directions: ``m`` directions (``"maximize"``/``"minimize"`` or ``StudyDirection``).
        reference_point: ``(m,)`` reference values in user units; points not strictly better than it in every
            objective add nothing.

    Returns:
        The hypervolume (0.0 for no points).
    """
    from pymoo.indicators.hv import HV

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return 0.0
    signs = _signs(directions)
    ref = np.asarray(reference_point, dtype=float) * signs
    return float(HV(ref_point=ref)(values.reshape(-1, len(signs)) * signs))


def normalised_hypervolume(values: np.ndarray, directions: Sequence[Any], reference_point: Sequence[float],
                           ideal_point: Sequence[float]) -> float | None:
    """The hypervolume of ``values`` as a fraction of the box between ``reference_point`` and ``ideal_point``
    (values beyond the ideal count as the ideal), so 0 = nothing better than the reference, 1 = the ideal
    reached; None when the box is empty in some objective."""
    signs = _signs(directions)
    ref, ideal = np.asarray(reference_point, dtype=float) * signs, np.asarray(ideal_point, dtype=float) * signs
    sides = ref - ideal
    if not np.all(sides > 0):
        return None
    f = np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs
    if len(f) == 0:
        return 0.0
    clipped = np.maximum(f, ideal)
    return float(hypervolume(clipped, ["minimize"] * len(signs), ref) / np.prod(sides))


def default_reference_point(values: np.ndarray, directions: Sequence[Any]) -> np.ndarray:
    """The nadir of ``values`` (``(n, m)``, user units) moved by :data:`REFERENCE_MARGIN` of the range."""
    signs = _signs(directions)
    f = np.asarray(values, dtype=float).reshape(-1, len(signs)) * signs
    if len(f) == 0:
        raise StudyError("no completed trials with finite values: cannot derive a hypervolume reference point")
    nadir, span = f.max(axis=0), np.ptp(f, axis=0)
    span = np.where(span > 0, span, np.maximum(np.abs(nadir), 1.0))
    return (nadir + REFERENCE_MARGIN * span) * signs


def resolve_reference_point(values: np.ndarray, objectives: Sequence[tuple[str, str]],
                            reference_point: ReferencePoint) -> np.ndarray:
    """The reference point as an ``(m,)`` array: given values (by name or in order), else the default.

    Objectives a mapping leaves out take their default (nadir-based) value.
    """
    names = [n for n, _ in objectives]
    if reference_point is not None and not isinstance(reference_point, Mapping):
        ref = np.asarray(reference_point, dtype=float)
        if ref.shape != (len(names),):
            raise ConfigError(f"reference point needs {len(names)} values ({', '.join(names)}), got {ref.size}")
        return ref
    given = dict(reference_point or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"reference point names unknown objective(s) {', '.join(unknown)}; "
                          f"known: {', '.join(names)}")
    if len(given) == len(names):
        return np.array([float(given[n]) for n in names])
    ref = default_reference_point(values, [d for _, d in objectives])
    return np.array([float(given.get(n, r)) for n, r in zip(names, ref, strict=True)])


# ---------------------------------------------------------------------------------------------------- studies

def objectives_of(study: optuna.Study) -> list[tuple[str, str]]:
    """``(name, direction)`` per objective; names from ``study.metric_names`` (else ``obj0``, ``obj1``...)."""
    dirs = [_direction(d) for d in study.directions]
    names = study.metric_names or study.user_attrs.get("objective_names") or [f"obj{i}" for i in range(len(dirs))]
    return list(zip(names, dirs, strict=True))


def _feasible_complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials with finite values, minus infeasible ones when the study uses constraints (as Optuna)."""
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if any(t.constraints for t in trials):
        trials = [t for t in trials if all(c <= 0.0 for c in t.constraints.values())]
    return [t for t in trials if t.values and all(math.isfinite(v) for v in t.values)]


def completed_values(study: optuna.Study) -> np.ndarray:
    """``(n, m)`` values of the completed feasible trials with finite values, in trial-number order."""
    trials = sorted(_feasible_complete(study), key=lambda t: t.number)
    return np.array([t.values for t in trials], dtype=float).reshape(len(trials), len(study.directions))


def _stored_reference(study: optuna.Study, reference_point: ReferencePoint) -> tuple[ReferencePoint, Any, str]:
    """``(reference point, ideal point or None, source)``: the argument when given, else the study's stored one."""
    from mergesearch.search.baselines import stored_reference

    stored = stored_reference(study)
    if reference_point is not None:
        return reference_point, (stored or {}).get("ideal"), "given"
    if stored is None:
        return None, None, "nadir"
    return stored["point"], stored.get("ideal"), str(stored.get("source", "baselines"))


def study_hypervolumes(study: optuna.Study, reference_point: ReferencePoint = None) -> tuple[float, float | None]:
    """``(raw, normalised or None)`` hypervolume of a study's completed trials against the study's stored
    reference point (unless one is given); :class:`StudyError` when none completed."""
    objectives = objectives_of(study)
    values = completed_values(study)
    if len(values) == 0:
        raise StudyError(f"study '{study.study_name}' has no completed trials")
    point, ideal, _ = _stored_reference(study, reference_point)
    ref = resolve_reference_point(values, objectives, point)
    dirs = [d for _, d in objectives]
    norm = None
    if ideal is not None and set(ideal) >= {n for n, _ in objectives}:
        norm = normalised_hypervolume(values, dirs, ref, [ideal[n] for n, _ in objectives])
    return hypervolume(values, dirs, ref), norm


def study_hypervolume(study: optuna.Study, reference_point: ReferencePoint = None) -> float:
    """Hypervolume of a study's completed trials (stored reference point unless one is given); :class:`StudyError`
    when none completed."""
    return study_hypervolumes(study, reference_point)[0]


def hypervolume_history(study: optuna.Study, reference_point: ReferencePoint = None, *,
                        normalised: bool = False) -> list[float]:
    """Hypervolume of the first k completed trials (by trial number), for k = 1..n.

    The reference point is fixed for the whole history (default: the study's stored one, else the nadir of *all*
    completed trials), so the curve is monotone. Only a trial that is not weakly dominated by the running front
    changes the value, so the hypervolume is recomputed only then, on the running front: 0.1-0.4 s for 1000
    trials in 2-4-D here.

    Args:
        normalised: as :func:`normalised_hypervolume` (the study must store an ideal point, else StudyError).
    """
    objectives = objectives_of(study)
    values = completed_values(study)
    if len(values) == 0:
        return []
    dirs = [d for _, d in objectives]
    point, ideal, _ = _stored_reference(study, reference_point)
    ref = resolve_reference_point(values, objectives, point)
    f, ref_min, mins = values * _signs(dirs), ref * _signs(dirs), ["minimize"] * len(dirs)
    scale = 1.0
    if normalised:
        if ideal is None or not set(ideal) >= {n for n, _ in objectives}:
            raise StudyError(f"study '{study.study_name}' stores no ideal point: no normalised hypervolume")
        best = np.array([ideal[n] for n, _ in objectives]) * _signs(dirs)
        sides = ref_min - best
        if not np.all(sides > 0):
            raise StudyError(f"study '{study.study_name}': the reference point is not worse than the ideal one")
        f, scale = np.maximum(f, best), float(np.prod(sides))
    front = np.zeros((0, f.shape[1]))
    history: list[float] = []
    hv = 0.0
    for row in f:
        if not np.all(front <= row, axis=1).any():  # a new non-dominated point: update front and volume
            front = np.vstack([front, row])
            front = front[non_dominated(front, mins)]
            hv = hypervolume(front, mins, ref_min) / scale
        history.append(hv)
    return history


def _local_file(url: str) -> Path | None:
    """The file a SQLite or journal URL names (None for server databases and ``memory://``)."""
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///"):])
    if url.startswith("journal://"):
        return Path(url[len("journal://"):])
    return Path(url) if "://" not in url and url.endswith(".log") else None


def open_storage(storage: str | Any) -> Any:
    """An existing storage from a URL (or plain SQLite file path; see :mod:`mergesearch.search.study`), or a
    ``BaseStorage`` as is. Never creates a storage file.

    Raises:
        StudyError: the storage file does not exist, or the storage cannot be opened (one line, password masked).
    """
    import optuna

    from mergesearch.search.study import _make_storage, _password, mask_url, storage_url

    if not isinstance(storage, str):
        return storage
    url = storage_url(storage)
    path = _local_file(url)
    if path is not None and not path.is_file():  # optuna would silently create an empty storage
        raise StudyError(f"storage file not found: {path}")
    try:
        st = _make_storage(url)
        optuna.get_all_study_names(storage=st)  # connects: a bad URL or schema fails here, not later
        return st
    except StudyError:
        raise
    except Exception as e:  # sqlalchemy / driver / schema errors: one line naming the storage
        first = (str(e).splitlines() or [""])[0]
        pw = _password(url)
        raise StudyError(f"cannot open storage {mask_url(url)}: {type(e).__name__}: "
                         f"{first.replace(pw, '***') if pw else first}") from None


def open_existing_study(study_or_storage: optuna.Study | str | Any, study_name: str | None = None) -> optuna.Study:
    """An existing study, from a Study, or a storage (URL as in :mod:`mergesearch.search.study`, or an
    ``optuna.storages.BaseStorage``) and a name. Never creates a storage file or a study.

    Raises:
        StudyError: the storage cannot be opened, its file does not exist, or the study is not in it (the
            message lists the studies that are); without ``study_name`` the storage must hold exactly one.
    """
    import optuna

    from mergesearch.search.study import mask_url

    if isinstance(study_or_storage, optuna.Study):
        return study_or_storage
    shown = mask_url(study_or_storage) if isinstance(study_or_storage, str) else str(study_or_storage)
    storage = open_storage(study_or_storage)
    try:
        names = optuna.get_all_study_names(storage=storage)
    except Exception as e:  # sqlalchemy / driver / schema errors: one line naming the storage
        first = (str(e).splitlines() or [""])[0]
        raise StudyError(f"cannot open storage {shown}: {type(e).__name__}: {first}") from None
    available = ", ".join(sorted(names)) or "none"
    if study_name is None:
        if len(names) != 1:
            raise StudyError(f"storage {shown} holds {len(names)} studies, name one; available: {available}")
        study_name = names[0]
    if study_name not in names:
        raise StudyError(f"study '{study_name}' not found in {shown}; available: {available}")
    return optuna.load_study(study_name=study_name, storage=storage)


def load_front(study_or_storage: optuna.Study | str | Any, study_name: str | None = None, *,
               reference_point: ReferencePoint = None) -> Front:
    """The Pareto front of a study (see the module docstring for the default reference point).

    Args:
        study_or_storage: an ``optuna.Study``, a storage URL (``sqlite:///x.db``, ``journal://x.log``, ...) or
            an ``optuna.storages.BaseStorage``.
        study_name: the study's name in the storage (optional when it holds exactly one).
        reference_point: hypervolume reference values by objective name (or in objective order); objectives
            left out default to the nadir-based value. Default: the study's stored reference point.

    Raises:
        StudyError: missing storage or study (lists the available ones), or no completed trials.
    """
    import optuna

    study = open_existing_study(study_or_storage, study_name)
    objectives = objectives_of(study)
    names = [n for n, _ in objectives]
    all_trials = study.get_trials(deepcopy=False)
    states = [t.state for t in all_trials]
    counts = {"complete": states.count(optuna.trial.TrialState.COMPLETE),
              "failed": states.count(optuna.trial.TrialState.FAIL),
              "running": states.count(optuna.trial.TrialState.RUNNING), "total": len(states),
              "pruned": states.count(optuna.trial.TrialState.PRUNED),
              "examples": sum(int(t.user_attrs.get("examples", 0)) for t in all_trials)}
    if counts["complete"] == 0:
        raise StudyError(f"study '{study.study_name}' has no completed trials ({counts['total']} in total, "
                         f"{counts['failed']} failed, {counts['running']} running)")
    values = completed_values(study)
    point, ideal, source = _stored_reference(study, reference_point)
    ref = resolve_reference_point(values, objectives, point) if len(values) else np.full(len(names), np.nan)
    best = [t for t in study.best_trials if all(math.isfinite(v) for v in t.values)]
    trials = [FrontTrial(number=t.number, values=dict(zip(names, map(float, t.values), strict=True)),
                         params=dict(t.params), plan=t.user_attrs.get("plan"),
                         summary=str(t.user_attrs.get("summary", "")),
                         test_values=t.user_attrs.get("test_values"), origin=_origin(t.user_attrs),
                         family=str(t.user_attrs.get("family", "static"))) for t in best]
    trials.sort(key=lambda t: _sort_key(t, objectives))
    hv = hypervolume(np.array([t.values for t in best], dtype=float).reshape(-1, len(names)),
                     [d for _, d in objectives], ref) if best else 0.0
    ref_by_name = dict(zip(names, map(float, ref), strict=True))
    norm = None
    if ideal is not None and set(ideal) >= set(names):
        norm = normalised_hypervolume(values, [d for _, d in objectives], ref, [ideal[n] for n in names])
    from mergesearch.search.baselines import stored_rows

    references = {r["name"]: {n: float(r["values"][n]) for n in names} for r in stored_rows(study)
                  if set(r["values"]) >= set(names)}
    info = [(t.number, str(t.user_attrs.get("summary", ""))) for t in sorted(_feasible_complete(study),
                                                                          key=lambda t: t.number)]
    return Front(objectives, trials, counts, hv, ref_by_name, values, study.study_name, norm, references, source,
                 info)


def _origin(user_attrs: Mapping[str, Any]) -> str:
    """``recipe`` for a ``search.initial`` trial, ``refines #n`` for a refinement, else ""."""
    if "refine_of" in user_attrs:
        return f"refines #{user_attrs['refine_of']}"
    return "recipe" if user_attrs.get("initial") else ""


# ---------------------------------------------------------------------------------------------------- rendering

def front_to_json(front: Front) -> dict[str, Any]:
    """The front as a JSON-ready dict: ``objectives``, ``hypervolume``, ``front`` first, then extras."""
    return {
        "objectives": [{"name": n, "direction": d} for n, d in front.objectives],
        "hypervolume": front.hypervolume,
        "front": [{"trial": t.number, "values": dict(t.values),
                   **({"test_values": dict(t.test_values)} if t.test_values else {}),
                   **({"origin": t.origin} if t.origin else {}),
                   **({"params": dict(t.params), "recipe": t.plan} if t.params or t.plan else {})}
                  for t in front.trials],
        "summary": {str(t.number): t.summary for t in front.trials},
        "counts": dict(front.counts),
        "reference_point": dict(front.reference_point),
        "reference_source": front.reference_source,
        "normalised_hypervolume": front.normalised_hypervolume,
        "references": [{"name": name, "values": dict(v), "reference": True, "dominated_by": front.dominating(v)}
                       for name, v in front.references.items()],
        "study": front.study_name,
    }


def _has_test(front: Front) -> bool:
    return any(t.test_values for t in front.trials)


def _rows(front: Front, fmt: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows (values formatted with ``fmt``) for the table and CSV; test columns when present."""
    arrow = {"maximize": "↑", "minimize": "↓"}
    header = ["trial"] + [f"{n} {arrow[d]}" for n, d in front.objectives]
    test = _has_test(front)
    if test:
        header += [f"{n} (test)" for n in front.names]
    header.append("plan")
    rows = []
    for t in front.trials:
        row = [str(t.number)] + [format(t.values[n], fmt) for n in front.names]
        if test:
            tv = t.test_values or {}
            row += [format(tv[n], fmt) if n in tv else "" for n in front.names]
        rows.append([*row, f"{t.summary} ({t.origin})" if t.origin else t.summary])
    for name, v in front.references.items():  # marked "ref" in the trial column: never a trial, never picked
        row = ["ref"] + [format(v[n], fmt) for n in front.names] + ([""] * len(front.names) if test else [])
        rows.append([*row, f"reference: {name}"])
    return header, rows


_SOURCE = {"baselines": "the base's scores, costs of the worst expert", "config": "search.reference_point",
           "given": "given", "nadir": "nadir of the trials"}


def hypervolume_text(front: Front) -> str:
    """``hypervolume 0.412 of the box to the best reference row (raw 1.23; reference point base ...)``."""
    ref = ", ".join(f"{n}={v:.4g}" for n, v in front.reference_point.items())
    where = f"reference point {ref}: {_SOURCE.get(front.reference_source, front.reference_source)}"
    if front.normalised_hypervolume is None:
        return f"hypervolume {front.hypervolume:.6g} ({where})"
    return f"hypervolume {front.normalised_hypervolume:.3g} normalised, {front.hypervolume:.6g} raw ({where})"


def dominance_text(front: Front) -> str | None:
    """One sentence on which reference rows the front strictly dominates (None without reference rows)."""
    if not front.references:
        return None
    beaten = {name: front.dominating(v) for name, v in front.references.items()}
    yes = [f"{name} (by #{', #'.join(map(str, nums[:3]))}{', ...' if len(nums) > 3 else ''})"
           for name, nums in beaten.items() if nums]
    no = [name for name, nums in beaten.items() if not nums]
    parts = [f"the front strictly dominates {', '.join(yes)}" if yes else "the front strictly dominates no "
             "reference row"]
    if no and yes:
        parts.append(f"not {', '.join(no)}")
    return "; ".join(parts)


def front_caption(front: Front) -> list[str]:
    """Lines for above/below the table: what the front is; the hypervolume and trial counts (and, with
    reference rows, which of them the front dominates)."""
    c = front.counts
    pruned = f", {c['pruned']} pruned" if c.get("pruned") else ""
    examples = f"; {c['examples']} examples scored" if c.get("examples") else ""
    below = (f"{hypervolume_text(front)}; trials: {c['total']} total, "
             f"{c['complete']} complete{pruned}, {c['failed']} failed, {c['running']} running{examples}")
    dom = dominance_text(front)
    return [f"Pareto front{' of ' + front.study_name if front.study_name else ''}: "
            f"{len(front.trials)} of {c['complete']} completed trials"
            + (" (rows 'ref': reference models, not trials)" if front.references else ""),
            below + (f"\n{dom}" if dom else "")]


def front_table(front: Front) -> Table:
    """A rich table of the front (trial, objective values, optional test values, plan summary)."""
    from rich.table import Table

    table = Table()
    header, rows = _rows(front, ".6g")
    for h in header:
        table.add_column(h, justify="left" if h == "plan" else "right", overflow="fold")
    for r in rows:
        table.add_row(*r)
    return table


def render_table(front: Front, width: int | None = None) -> str:
    """The table with its caption lines as plain text (for ``typer.echo``); width defaults to the terminal's."""
    import shutil

    from rich.console import Console

    width = width or shutil.get_terminal_size((120, 24)).columns
    console = Console(width=width, record=True, file=io.StringIO())
    title, caption = front_caption(front)
    console.print(title, highlight=False, soft_wrap=True)
    console.print(front_table(front))
    console.print(caption, highlight=False, soft_wrap=True)
    return console.export_text().rstrip("\n")


def front_to_csv(front: Front) -> str:
    """The front as CSV text (header row, then one row per front trial)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header, rows = _rows(front, "")  # "" = shortest round-trip repr
    writer.writerow([h.replace(" ↑", "").replace(" ↓", "") for h in header])
    writer.writerows(rows)
    return buf.getvalue()
