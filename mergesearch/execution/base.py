"""The Executor protocol and the result record every executor returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Worker(Protocol):
    """Evaluates candidates on a resident model; built once per worker process by a picklable factory."""

    def evaluate(self, spec: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any]]:
        """Build the candidate (a :mod:`mergesearch.candidates` spec, or a bare ``MergePlan.to_dict()``) and
        score it; a ``"rungs"`` entry of ``spec`` (a :class:`~mergesearch.search.fidelity.Rungs`) scores it in
        fidelity stages.

        Returns:
            ``({objective name: value} or None when a lower rung stopped it, report)``; the report holds seconds
            by phase (``merge``, ``eval``) and, where examples were scored, ``examples`` (int), ``rungs``
            (the values at each lower rung reached) and, with a fidelity estimator, ``per_example``.

        Raises:
            TrialError: the candidate is bad (NaN score, invalid plan); the worker stays usable.
        """
        ...


#: A picklable zero-argument callable that builds a Worker inside the worker process.
WorkerFactory = Callable[[], Worker]


@dataclass
class TrialResult:
    """What came back for one submitted trial."""

    trial: int
    values: dict[str, float] | None
    error: str | None = None
    worker: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: queue, merge, eval, total
    attempts: int = 1
    #: the worker's traceback when the engine failed (a bug, not a bad candidate): the run stops
    engine_error: str | None = None
    #: values at each lower fidelity rung reached (see :mod:`mergesearch.search.fidelity`)
    rungs: list[dict[str, float]] = field(default_factory=list)
    #: examples scored (summed over objectives and rungs)
    examples: int = 0
    #: a lower rung stopped the trial: no full-fidelity values
    pruned: bool = False
    #: with a fidelity estimator: per objective, each example's value (see evaluate_staged)
    per_example: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.values is not None


class Executor(Protocol):
    """A pool of workers running trials asynchronously: no generation barrier."""

    @property
    def size(self) -> int:
        """Number of workers."""
        ...

    def idle(self) -> int:
        """How many trials the executor takes now: its idle workers, plus free places in its queue for a pool
        that prefetches (the driver asks the optimizer for this many)."""
        ...

    def submit(self, trial: int, plan: dict[str, Any]) -> None:
        """Queue one trial on an idle worker."""
        ...

    def completed(self, timeout: float | None = None) -> list[TrialResult]:
        """Results finished since the last call; waits up to ``timeout`` s for at least one."""
        ...

    def close(self) -> None:
        """Stop the workers (and the Ray instance the executor started, if any)."""
        ...
