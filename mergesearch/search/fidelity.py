"""Multi-fidelity evaluation: fidelity rungs, the multi-objective promotion rule, what the optimizer learns from.

With ``search.fidelity: {rungs: [N1, N2, ...], keep: 1/3}`` a trial is scored in stages: each objective with
examples on the first ``N1`` of its seeded subset, then ``N2`` (the same ``N1`` plus the next ``N2 - N1``), ...,
then on the whole subset (``limit``). The merge is done once; each stage scores only the new examples.

After each lower rung the worker decides at once whether the trial goes on (asynchronous successive halving: no
waiting for a rung to fill, so workers never idle): the trial's score vector at rung k is ranked among the
vectors every earlier trial reached at rung k — by non-dominated rank, then crowding distance — and it goes on
when it is within the best ``keep`` fraction. The driver sends, with each trial, the vectors known when it is
submitted (:class:`Rungs`); the rule itself (:func:`promoted`) is a pure function of them, so a decision can
be replayed from the stored trials.

A stopped trial is stored PRUNED with its partial scores (user attr ``rungs``). The front, refinement, the
hypervolume and ``--trials`` use full-fidelity (COMPLETE) trials only.

**What the optimizer learns from** (:func:`best_estimate`): every finished trial, with its best estimate of
its full-fidelity scores — a COMPLETE trial with its scores, a PRUNED one with its scores at the last rung it
reached. Why this and not "full fidelity only", nor one model per rung (BOHB): the fidelity here is a sample
size, not a training length. A rung's score is the objective on a seeded random prefix of the same subset, so
it estimates the same quantity as the full score, without bias, only with more noise (accuracy on 16 examples:
± ~0.12; on 128: ± ~0.04), and a cost objective (l1, parameters) is exact at every rung. Low-budget results in
hyper-parameter search (few epochs) are biased, which is why BOHB models a single budget; here mixing rungs is
sound, and a pruned trial's estimate errs on the safe side (it was stopped because it looked worse than most).
A BOHB view (the highest rung with enough trials) would, once it moves up a rung, hide again the trials stopped
below it, which is what went wrong here:
hiding pruned trials starves every model-based backend. On the demo (rungs [16, 48] of 128, keep 1/3),
TPE saw complete trials only, so it sampled at random until its 10th complete trial (trial 26 to 51), and
afterwards only 0 to 19 of its next 160 to 280 trials completed: it kept proposing a corner no complete trial
had visited (every weight near 1), each proposal was pruned at the first rung, and since pruned trials were
invisible its data never changed. With estimates, every finished trial changes what the optimizer sees.
Every backend gets this view through one seam (:class:`~mergesearch.search.optimizers.pending.SamplingStorage`).

**Estimator** (``estimator: regression``, promotion only): trials store their per-example values; the driver
fits, per task and rung, a regression of the full score on the rung's per-example values (:func:`fit_rung_model`)
and promotion compares every trial's estimate (:func:`estimate`) instead of its rung score.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: user attr of a trial: its scores at each lower rung reached, ``[{"n": N_k, "values": {name: value}}, ...]``
RUNGS_ATTR = "rungs"
#: user attr of a trial: examples scored for it (summed over objectives and rungs)
EXAMPLES_ATTR = "examples"
#: user attr of a trial (with ``fidelity.estimator``): ``{objective: [value of each example scored, in order]}``
PER_EXAMPLE_ATTR = "per_example"
#: the estimator fits a rung's model once this many trials more than the rung's examples scored it in full
MIN_SCORED = 5


def crowding(points: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance of each row of ``points`` ``(n, m)``: inf at each objective's extremes."""
    n, m = points.shape
    out = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(points[:, j], kind="stable")
        span = points[order[-1], j] - points[order[0], j]
        out[order[0]] = out[order[-1]] = np.inf
        if span > 0:
            out[order[1:-1]] += (points[order[2:], j] - points[order[:-2], j]) / span
    return out


def promoted(seen: Sequence[Sequence[float]], own: Sequence[float], signs: Sequence[float], keep: float) -> bool:
    """Whether a trial with score vector ``own`` at a rung goes on, given the vectors ``seen`` there before.

    All vectors (``seen`` and ``own``) are ordered by non-dominated rank, then by crowding distance within a
    front (larger first); ``own`` goes on when fewer than ``max(1, ceil(keep * count))`` vectors are strictly
    ahead of it (ties are resolved in its favour: a rung of few examples gives many equal scores).

    Args:
        seen: ``(n, m)`` vectors other trials reached at this rung.
        own: ``(m,)`` this trial's vector.
        signs: per objective, +1 if minimised, -1 if maximised (``value * sign`` is minimised).
        keep: the fraction kept, in (0, 1].

    Measured on the demo (3 accuracies + l1, rungs [16, 48], keep 1/3): about 0.6 of the trials reaching a rung
    go on, not 1/3. With four objectives two thirds of the vectors are mutually non-dominated, so the rank
    rarely decides and crowding does; a vector tied with the worst value of its front on some objective (few
    distinct accuracies at 16 examples) gets infinite crowding, and a later, better sampler outranks earlier
    trials. Comparing with the last 30 vectors only instead of all changed nothing measurable.
    """
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    points = np.asarray([*seen, own], dtype=float).reshape(len(seen) + 1, len(own)) * np.asarray(signs)
    me = len(points) - 1
    ahead = 0
    for front in NonDominatedSorting().do(points):
        front = np.asarray(front)
        if me in front:
            cd = crowding(points[front])
            mine = cd[np.flatnonzero(front == me)[0]]
            ahead += int(np.sum(cd > mine))
            break
        ahead += len(front)
    return ahead < max(1, math.ceil(keep * len(points)))


@dataclass(frozen=True)
class Rungs:
    """One trial's evaluation schedule, sent with it to the worker.

    Attributes:
        sizes: examples per objective at each lower rung (N1 < N2 < ...); the last stage is always the full
            subset. An objective with fewer examples than a rung uses all it has there.
        keep: fraction of a rung's trials that go on.
        names: objective names, in study order.
        signs: per objective, +1 if minimised, -1 if maximised.
        seen: per lower rung, the vectors (in ``names`` order) earlier trials reached there.
    """

    sizes: tuple[int, ...]
    keep: float
    names: tuple[str, ...]
    signs: tuple[float, ...]
    seen: tuple[tuple[tuple[float, ...], ...], ...] = ()
    #: the estimator's models per objective and rung size (:func:`fit_rung_model`); ``estimator`` set: the
    #: worker reports its per-example values
    models: Mapping[str, Mapping[int, RungModel]] = field(default_factory=dict)
    estimator: str = "none"

    def promoted(self, k: int, values: Mapping[str, float],
                 per_example: Mapping[str, Sequence[float]] | None = None) -> bool:
        """Whether a trial scoring ``values`` at lower rung ``k`` goes on to the next stage (judged on its
        :func:`estimate` from ``per_example`` where the estimator has a model; ``seen`` holds such estimates)."""
        seen = self.seen[k] if k < len(self.seen) else ()
        own = estimate(values, per_example or {}, self.models)
        return promoted(seen, [own[n] for n in self.names], self.signs, self.keep)


@dataclass(frozen=True)
class RungModel:
    """The estimator of one objective at one rung: full ≈ mean(v) + b0 + β·(v − mu) for the values v of the
    rung's N examples (:func:`fit_rung_model`)."""

    mu: tuple[float, ...]
    b0: float
    beta: tuple[float, ...]

    def __call__(self, v: Sequence[float]) -> float:
        x = np.asarray(v, dtype=float)
        return float(x.mean() + self.b0 + (x - np.asarray(self.mu)) @ np.asarray(self.beta))


def estimate(values: Mapping[str, float], per_example: Mapping[str, Sequence[float]],
             models: Mapping[str, Mapping[int, RungModel]]) -> dict[str, float]:
    """A trial's scores at a rung, each replaced by its full-subset estimate where the objective has a
    :class:`RungModel` for the number of examples the trial scored (``fidelity.estimator: regression``)."""
    out = dict(values)
    for name, by_size in models.items():
        v = per_example.get(name)
        if v and name in out and len(v) in by_size:
            out[name] = by_size[len(v)](v)
    return out


def fit_rung_model(rows: Sequence[Sequence[float]], full: Sequence[float]) -> RungModel | None:
    """Ridge regression of the full-subset score minus the rung mean on the rung's per-example values
    (centred), over trials that scored both; the ridge penalty by generalised cross-validation.

    Why not an additive difficulty model (v_tj = a_t + d_j) or Rasch: trials at one rung share its examples,
    so either changes every trial's estimate by the same amount (Rasch: the raw score is sufficient for the
    ability) and no promotion decision. A regression weighs the examples by how much they tell about the full
    score (like IRT's discriminations); a large penalty gives back the rung mean plus a constant.

    Returns:
        The model, or None with fewer than :data:`MIN_SCORED` + the number of examples trials to fit on.
    """
    x = np.asarray(rows, dtype=float)
    if x.ndim != 2 or len(x) < MIN_SCORED + x.shape[1]:
        return None
    y = np.asarray(full, dtype=float) - x.mean(axis=1)
    mu, b0 = x.mean(axis=0), float(y.mean())
    u, sv, vt = np.linalg.svd(x - mu, full_matrices=False)
    uy = u.T @ (y - b0)
    best = None
    for lam in np.logspace(-4, 4, 33) * max(float((sv ** 2).mean()), 1e-12):
        shrink = sv ** 2 / (sv ** 2 + lam)
        resid = float(((y - b0) ** 2).sum() - ((2 * shrink - shrink ** 2) * uy ** 2).sum())
        gcv = len(x) * resid / max(len(x) - shrink.sum(), 1e-9) ** 2
        if best is None or gcv < best[0]:
            best = (gcv, vt.T @ (sv / (sv ** 2 + lam) * uy))
    return RungModel(tuple(float(m) for m in mu), b0, tuple(float(c) for c in best[1]))


class RungHistory:
    """What earlier trials reached at each lower rung: the ``seen`` vectors of :class:`Rungs`, and with
    ``estimator: regression`` the rung models fitted on their per-example values, every vector then being that
    trial's :func:`estimate`.

    A stored rung counts only where its size is the configured one (a study resumed with other rungs starts
    those rungs afresh).
    """

    def __init__(self, sizes: Sequence[int], names: Sequence[str], estimator: str = "none") -> None:
        self.sizes, self.names, self.estimator = list(sizes), list(names), estimator
        self._trials: list[tuple[list[Mapping[str, float]], Mapping[str, Sequence[float]]]] = []
        self._cache: tuple[tuple, dict] | None = None

    @classmethod
    def of(cls, trials: Iterable[Any], sizes: Sequence[int], names: Sequence[str],
           estimator: str = "none") -> RungHistory:
        """The history of stored ``trials`` (their ``rungs`` and ``per_example`` attrs)."""
        history = cls(sizes, names, estimator)
        for t in trials:
            history.add(t.user_attrs.get(RUNGS_ATTR) or (), t.user_attrs.get(PER_EXAMPLE_ATTR) or {})
        return history

    def add(self, entries: Sequence[Any], per_example: Mapping[str, Sequence[float]]) -> None:
        """One trial's rung scores as stored (``[{"n": N_k, "values": {name: value}}, ...]``) and its
        per-example values; rungs of other sizes than the configured ones are left out."""
        kept = []
        for k, e in enumerate(entries):
            values = e.get("values") if isinstance(e, Mapping) else None
            if k >= len(self.sizes) or not isinstance(values, Mapping) or e.get("n") != self.sizes[k] \
                    or not all(n in values for n in self.names):
                break
            kept.append({n: float(values[n]) for n in self.names})
        self._trials.append((kept, per_example))
        self._cache = None

    def models(self) -> dict[str, dict[int, RungModel]]:
        """The estimator's models per objective and rung size (empty without an estimator or enough data)."""
        return self._fit()[1]

    def seen(self) -> tuple[tuple[tuple[float, ...], ...], ...]:
        """Per lower rung, the vectors (in ``names`` order) trials reached there, estimated where fitted."""
        return self._fit()[0]

    def _fit(self) -> tuple[tuple, dict]:
        if self._cache is None:
            models: dict[str, dict[int, RungModel]] = {}
            if self.estimator != "none":
                for name in self.names:
                    done = [pe[name] for _, pe in self._trials if pe.get(name)]
                    n = max((len(v) for v in done), default=0)
                    full = [v for v in done if len(v) == n]
                    for size in {min(s, n) for s in self.sizes if min(s, n) < n}:
                        model = fit_rung_model([v[:size] for v in full], [float(np.mean(v)) for v in full])
                        if model is not None:
                            models.setdefault(name, {})[size] = model
            seen: list[list[tuple[float, ...]]] = [[] for _ in self.sizes]
            for rungs, per_example in self._trials:
                for k, values in enumerate(rungs):
                    own = estimate(values, {n: v[:self.sizes[k]] for n, v in per_example.items()}, models)
                    seen[k].append(tuple(own[n] for n in self.names))
            self._cache = (tuple(tuple(v) for v in seen), models)
        return self._cache


def examples_spent(trials: Iterable[Any]) -> int:
    """Examples scored for the stored ``trials`` (their ``examples`` attr; trials without one count 0)."""
    return sum(int(t.user_attrs.get(EXAMPLES_ATTR, 0)) for t in trials)


def best_estimate(trial: Any, names: Sequence[str]) -> Any:
    """What an optimizer learns from a PRUNED ``trial``: a COMPLETE copy valued at the last rung it reached.

    The values are the trial's scores there, in ``names`` order (the study's objectives): each an estimate of
    the trial's full-fidelity score (see the module docstring). None when the trial has no such scores (a
    trial pruned by something else, or scored under other objectives): optimizers then do not see it.
    Other trials are returned as they are.
    """
    from optuna.trial import FrozenTrial, TrialState

    if trial.state != TrialState.PRUNED:
        return trial
    rungs = trial.user_attrs.get(RUNGS_ATTR) or ()
    values = rungs[-1].get("values") if rungs and isinstance(rungs[-1], Mapping) else None
    if not isinstance(values, Mapping) or not names or not all(n in values for n in names):
        return None
    try:
        told = [float(values[n]) for n in names]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in told):
        return None
    return FrozenTrial(number=trial.number, state=TrialState.COMPLETE, value=None, values=told,
                       datetime_start=trial.datetime_start, datetime_complete=trial.datetime_complete,
                       params=trial.params, distributions=trial.distributions, user_attrs=trial.user_attrs,
                       system_attrs=trial.system_attrs, intermediate_values=trial.intermediate_values,
                       trial_id=trial._trial_id)
