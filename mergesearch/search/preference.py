"""Pick one trial from a Pareto front by preference: weights (ASF or pseudo-weights), hard minimums, or the knee.

All methods work on the front's objectives normalised to [0, 1] after converting to minimisation: 0 is the
front's best (ideal) value of that objective, 1 its worst (nadir); an objective with no spread on the front is
all 0 and cannot decide anything. Minimums filter the front *after* normalisation, so weights mean the same
thing whatever the minimums are.

- ``asf`` (default): pymoo's achievement scalarising function ``max_i w_i f_i`` (``ASF().do(F, 1/w)``), lowest
  wins; exact ties are broken by the weighted sum ``sum_i w_i f_i``. Weight 0 ignores an objective.
- ``pseudo-weights``: pymoo's ``PseudoWeights``: each point's pseudo-weight vector (its normalised distance to
  the nadir, summing to 1); the point whose pseudo-weights are closest (L1) to the normalised ``w`` wins.
- ``knee``: pymoo's ``HighTradeoffPoints`` (points whose local sacrifice/gain trade-off is an outlier). It
  may find none (or fail on small fronts); ranking then — and among several knees — uses the distance beyond
  the hyperplane through the extremes (in 2-D the line joining them) towards the ideal, i.e. the smallest sum of
  normalised objectives. Weights are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from mergesearch.errors import ConfigError, MergeSearchError
from mergesearch.search.pareto import Front, FrontTrial

Method = Literal["asf", "pseudo-weights", "knee"]
METHODS: tuple[str, ...] = ("asf", "pseudo-weights", "knee")


@dataclass
class Pick:
    """The chosen trial and why.

    Attributes:
        trial: the chosen front trial.
        rank: its rank under the preference (1 = best) among the ``n_candidates`` front trials meeting the
            minimums (always 1 for the chosen one; kept so the explanation can state "1 of n").
        n_candidates: how many front trials met the minimums.
        runner_up: the second-ranked trial (None when only one candidate).
        ranking: all candidates, best first.
        scores: the method's score per candidate in ``ranking`` order (lower is better; for the knee, the sum
            of normalised objectives, with pymoo's high-trade-off points ranked before all others).
        method: the method used; ``weights``: the normalised weights used (sum 1).
        explanation: human-readable lines.
    """

    trial: FrontTrial
    rank: int
    n_candidates: int
    runner_up: FrontTrial | None
    ranking: list[FrontTrial]
    scores: list[float]
    method: str
    weights: dict[str, float]
    explanation: list[str] = field(default_factory=list)


def _parse_pairs(items: Iterable[str], flag: str, what: str) -> dict[str, float]:
    """``["a=1,b=2", "c=3"]`` → ``{"a": 1.0, "b": 2.0, "c": 3.0}``; ConfigError naming the bad piece."""
    out: dict[str, float] = {}
    for item in items:
        for piece in str(item).split(","):
            name, sep, text = piece.strip().partition("=")
            name = name.strip()
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not sep or not name or not math.isfinite(value):
                raise ConfigError(f"{flag}: expected OBJ={what}, got '{piece.strip()}'")
            if name in out:
                raise ConfigError(f"{flag}: objective '{name}' given twice")
            out[name] = value
    return out


def parse_prefer(text: str) -> dict[str, float]:
    """``"reverse=1,swap=0.5"`` → ``{"reverse": 1.0, "swap": 0.5}`` (ConfigError on malformed text)."""
    return _parse_pairs([text], "--prefer", "WEIGHT[,OBJ=WEIGHT...]")


def parse_minimums(items: Sequence[str]) -> dict[str, float]:
    """``["reverse=0.8", "swap=0.5"]`` → ``{"reverse": 0.8, "swap": 0.5}`` (ConfigError on malformed text)."""
    return _parse_pairs(items, "--min", "VALUE")


def _check_names(given: Mapping[str, float], names: Sequence[str], flag: str) -> None:
    unknown = [n for n in given if n not in names]
    if unknown:
        raise ConfigError(f"{flag}: unknown objective '{unknown[0]}'; known: {', '.join(names)}")


def _weights(prefer: Mapping[str, float] | None, names: Sequence[str]) -> np.ndarray:
    """Weights in objective order, summing to 1; unnamed objectives get 0, no preference → equal weights."""
    if not prefer:
        return np.full(len(names), 1.0 / len(names))
    _check_names(prefer, names, "--prefer")
    for n, w in prefer.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"--prefer: weight of '{n}' must be a finite number >= 0, got {w}")
    w = np.array([float(prefer.get(n, 0.0)) for n in names])
    if w.sum() <= 0:
        raise ConfigError("--prefer: all weights are zero; give at least one objective a positive weight")
    return w / w.sum()


def normalise(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """``(n, m)`` user-unit values → minimisation form scaled to [0, 1] per objective (ideal 0, nadir 1)."""
    f = np.asarray(values, dtype=float) * np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    lo, span = f.min(axis=0), np.ptp(f, axis=0)
    return (f - lo) / np.where(span > 0, span, 1.0)


def _feasible(front: Front, values: np.ndarray, minimums: Mapping[str, float]) -> np.ndarray:
    """Boolean mask of front trials at least as good as every minimum; MergeSearchError when none is."""
    mask = np.ones(len(values), dtype=bool)
    for j, (n, d) in enumerate(front.objectives):
        if n in minimums:
            mask &= values[:, j] >= minimums[n] if d == "maximize" else values[:, j] <= minimums[n]
    if mask.any():
        return mask
    for j, (n, d) in enumerate(front.objectives):
        if n in minimums:
            best = values[:, j].max() if d == "maximize" else values[:, j].min()
            ok = best >= minimums[n] if d == "maximize" else best <= minimums[n]
            if not ok:
                op = ">=" if d == "maximize" else "<="
                raise MergeSearchError(f"--min {n}={minimums[n]:g}: no front trial has {n} {op} {minimums[n]:g} "
                                       f"(best on the front: {best:.6g})")
    together = ", ".join(f"{n}={v:g}" for n, v in minimums.items())
    raise MergeSearchError(f"--min: no front trial meets all of {together} together")


def _knee_order(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """High-trade-off points (pymoo) first, each group by the sum of ``f`` (the distance beyond the extremes)."""
    from pymoo.mcdm.high_tradeoff import HighTradeoffPoints

    score = f.sum(axis=1)
    try:
        knees = HighTradeoffPoints().do(f) if len(f) > 2 else None
    except Exception:  # pymoo raises various errors on tiny or degenerate fronts; fall back to the distance
        knees = None
    is_knee = np.zeros(len(f), dtype=bool)
    if knees is not None:
        is_knee[np.asarray(knees, dtype=int)] = True
    order = np.lexsort((score, ~is_knee))
    note = ("a high trade-off point (pymoo HighTradeoffPoints)" if is_knee.any() else
            "no high trade-off point found; farthest beyond the line/plane through the extremes")
    return order, score, note


def _order(f: np.ndarray, w: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Candidate order (best first), each candidate's score (lower is better) and a note, for ``f`` (``(k, m)``)."""
    if method == "asf":
        from pymoo.decomposition.asf import ASF

        with np.errstate(divide="ignore"):  # w = 0 → 1/w = inf → that objective contributes 0
            score = np.asarray(ASF().do(f, 1.0 / w), dtype=float).reshape(-1)
        return np.lexsort(((f * w).sum(axis=1), score)), score, "max_i w_i f_i"
    if method == "pseudo-weights":
        from pymoo.mcdm.pseudo_weights import PseudoWeights

        if len(f) == 1:
            return np.zeros(1, dtype=int), np.zeros(1), "the only candidate"
        _, pw = PseudoWeights(w, ideal=np.zeros(f.shape[1]), nadir=np.ones(f.shape[1])).do(
            f, return_pseudo_weights=True)
        pw = np.nan_to_num(np.asarray(pw, dtype=float), nan=1.0 / f.shape[1])  # a point at the nadir everywhere
        score = np.abs(pw - w).sum(axis=1)
        return np.argsort(score, kind="stable"), score, "L1 distance of its pseudo-weights to the weights"
    return _knee_order(f)


def pick(front: Front | tuple[np.ndarray, Sequence[tuple[str, str]]], prefer: Mapping[str, float] | None = None,
         *, minimums: Mapping[str, float] | None = None, method: Method = "asf") -> Pick:
    """Choose one trial from ``front`` (see the module docstring for the methods).

    Args:
        front: a :class:`Front`, or ``(values (n, m) in user units, [(name, direction), ...])``.
        prefer: weight per objective name (>= 0, not all zero; unnamed objectives get 0); empty → equal weights.
        minimums: per objective, the value the pick must be at least as good as (``>=`` for maximised, ``<=``
            for minimised objectives).
        method: ``"asf"``, ``"pseudo-weights"`` or ``"knee"``.

    Raises:
        ConfigError: empty front, unknown objective, negative or all-zero weights, unknown method.
        MergeSearchError: no front trial meets the minimums (names the one that cannot be met).
    """
    if not isinstance(front, Front):
        front = Front.from_values(*front)
    if method not in METHODS:
        raise ConfigError(f"--method: unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if not front.trials:
        raise ConfigError("cannot pick from an empty front (no completed feasible trials)")
    names = front.names
    w = _weights(prefer, names)
    minimums = dict(minimums or {})
    _check_names(minimums, names, "--min")
    values = front.values()
    mask = _feasible(front, values, minimums)
    f = normalise(values, front.directions)[mask]
    candidates = [t for t, ok in zip(front.trials, mask, strict=True) if ok]
    order, score, note = _order(f, w, method)
    ranking = [candidates[i] for i in order]
    chosen = ranking[0]
    result = Pick(trial=chosen, rank=1, n_candidates=len(candidates),
                  runner_up=ranking[1] if len(ranking) > 1 else None, ranking=ranking,
                  scores=[float(score[i]) for i in order], method=method,
                  weights=dict(zip(names, map(float, w), strict=True)))
    result.explanation = _explain(front, result, minimums, note)
    return result


def _explain(front: Front, p: Pick, minimums: Mapping[str, float], note: str) -> list[str]:
    """Human-readable lines: the choice, its values and per-objective standing, the runner-up."""
    def vals(t: FrontTrial) -> str:
        return ", ".join(f"{n}={t.values[n]:.4g}" for n in front.names)

    how = {"asf": "achievement scalarising function", "pseudo-weights": "pseudo-weights",
           "knee": "knee point (high trade-off)"}[p.method]
    weights = "" if p.method == "knee" else " with weights " + ", ".join(f"{n}={v:.3g}" for n, v in p.weights.items())
    lines = [f"chose trial {p.trial.number}: {vals(p.trial)}",
             f"rank {p.rank} of {p.n_candidates} front trials under the {how}{weights}",
             f"score {p.scores[0]:.4g} (lower is better; {note})"]
    if minimums:
        excluded = len(front.trials) - p.n_candidates
        lines.append(f"minimums {', '.join(f'{n}={v:g}' for n, v in minimums.items())} excluded "
                     f"{excluded} of {len(front.trials)} front trials")
    standing = []
    for n, d in front.objectives:
        better = sum((t.values[n] > p.trial.values[n]) if d == "maximize" else (t.values[n] < p.trial.values[n])
                     for t in front.trials)
        standing.append(f"{n} #{better + 1}")
    lines.append(f"on the front of {len(front.trials)} it places " + ", ".join(standing))
    if p.runner_up is not None:
        lines.append(f"runner-up: trial {p.runner_up.number}: {vals(p.runner_up)} (score {p.scores[1]:.4g})")
    if p.trial.summary:
        lines.append(f"plan: {p.trial.summary}")
    return lines
