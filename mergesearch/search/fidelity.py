"""Multi-fidelity evaluation: fidelity rungs and the multi-objective promotion rule.

With ``search.fidelity: {rungs: [N1, N2, ...], keep: 1/3}`` a trial is scored in stages: each objective with
examples on the first ``N1`` of its seeded subset, then ``N2`` (the same ``N1`` plus the next ``N2 - N1``), ...,
then on the whole subset (``limit``). The merge is done once; each stage scores only the new examples.

After each lower rung the worker decides at once whether the trial goes on (asynchronous successive halving: no
waiting for a rung to fill, so workers never idle): the trial's score vector at rung k is ranked among the
vectors every earlier trial reached at rung k — by non-dominated rank, then crowding distance — and it goes on
when it is within the best ``keep`` fraction. The driver sends, with each trial, the vectors known when it is
submitted (:class:`Rungs`); the rule itself (:func:`promoted`) is a pure function of them, so a decision can
be replayed from the stored trials.

A stopped trial is stored PRUNED with its partial scores (user attr ``rungs``); the optimizer, the front,
refinement and the hypervolume use full-fidelity (COMPLETE) trials only. Why not a model with fidelity as an
input: a rung's score is a noisy, unbiased estimate of the full score (a random prefix), so low rungs carry
little information beyond "worse than most" — which is what the rule already used; mixing fidelities in the
optimizer's data would add noise to every backend, and only some (a GP) could model it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: user attr of a trial: its scores at each lower rung reached, ``[{"n": N_k, "values": {name: value}}, ...]``
RUNGS_ATTR = "rungs"
#: user attr of a trial: examples scored for it (summed over objectives and rungs)
EXAMPLES_ATTR = "examples"


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

    def promoted(self, k: int, values: Mapping[str, float]) -> bool:
        """Whether a trial scoring ``values`` at lower rung ``k`` goes on to the next stage."""
        seen = self.seen[k] if k < len(self.seen) else ()
        return promoted(seen, [values[n] for n in self.names], self.signs, self.keep)


def rung_table(trials: Iterable[Any], sizes: Sequence[int], names: Sequence[str]) -> list[list[tuple[float, ...]]]:
    """Per lower rung, the score vectors the stored ``trials`` reached there (from their ``rungs`` attr).

    A stored rung counts only where its size is the configured one (a study resumed with other rungs starts
    those rungs afresh).
    """
    table: list[list[tuple[float, ...]]] = [[] for _ in sizes]
    for t in trials:
        for k, entry in enumerate(t.user_attrs.get(RUNGS_ATTR) or ()):
            if k < len(sizes) and entry.get("n") == sizes[k] and all(n in entry["values"] for n in names):
                table[k].append(tuple(float(entry["values"][n]) for n in names))
    return table


def examples_spent(trials: Iterable[Any]) -> int:
    """Examples scored for the stored ``trials`` (their ``examples`` attr; trials without one count 0)."""
    return sum(int(t.user_attrs.get(EXAMPLES_ATTR, 0)) for t in trials)

