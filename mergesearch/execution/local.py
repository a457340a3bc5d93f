"""The in-process executor, and the per-trial bookkeeping every executor shares.

:func:`run_trial` is what a worker process does with one trial (also inside each Ray actor): call the Worker,
turn any exception or non-finite score into a failed :class:`TrialResult` with a one-line reason, and time it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

from mergesearch.errors import ExecutionError, MergeSearchError, TrialError
from mergesearch.execution.base import TrialResult, Worker, WorkerFactory


def one_line(exc: BaseException) -> str:
    """A one-line reason for an exception: our own errors by message, others prefixed by their type."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if isinstance(exc, MergeSearchError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def build_worker(factory: WorkerFactory) -> Worker:
    """Call the factory; a failure becomes an ExecutionError carrying the factory's one-line reason."""
    try:
        return factory()
    except Exception as exc:  # any factory failure is the user's setup (model path, dtype, device)
        raise ExecutionError(f"worker could not start: {one_line(exc)}") from exc


def run_trial(worker: Worker, trial: int, plan: dict[str, Any], submitted_at: float, name: str) -> TrialResult:
    """Evaluate one candidate on a resident worker; never raises (an engine error comes back in the result).

    Args:
        worker: the resident Worker.
        trial: trial number, echoed in the result.
        plan: ``MergePlan.to_dict()``.
        submitted_at: ``time.time()`` when the driver submitted the trial (wall clock, comparable across
            processes on one machine; across nodes the queue time is as good as the clocks' sync).
        name: worker id recorded in the result.
    """
    start = time.time()
    timings = {"queue": max(0.0, start - submitted_at)}
    rungs, examples, per_example = [], 0, {}
    try:
        values, report = worker.evaluate(plan)
        rungs, examples = list(report.get("rungs", ())), int(report.get("examples", 0))
        per_example = dict(report.get("per_example") or {})
        if values is not None:
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                raise TrialError(f"objective {bad[0]!r} returned {values[bad[0]]}")
            values = {k: float(v) for k, v in values.items()}
        error = None
        timings.update({k: float(report[k]) for k in ("merge", "eval") if k in report})
    except Exception as exc:  # never take the worker down: a bad candidate fails its trial, a bug stops the run
        values, error = None, one_line(exc)
        if not candidate_failure(exc):
            import traceback

            timings["total"] = time.time() - submitted_at
            return TrialResult(trial=trial, values=None, error=error, worker=name, timings=timings,
                               engine_error=traceback.format_exc())
    timings["total"] = time.time() - submitted_at
    return TrialResult(trial=trial, values=values, error=error, worker=name, timings=timings, rungs=rungs,
                       examples=examples, pruned=error is None and values is None, per_example=per_example)


def candidate_failure(exc: BaseException) -> bool:
    """Whether an exception is the candidate's fault (our own errors: a bad plan, a NaN score, a non-finite merge;
    or running out of memory on a large candidate) rather than an engine bug (anything else)."""
    return isinstance(exc, (MergeSearchError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"


class LocalExecutor:
    """One worker in the driver process: trials run when :meth:`completed` is called, one after another."""

    def __init__(self, factory: WorkerFactory) -> None:
        self._worker = build_worker(factory)
        self._queue: deque[tuple[int, dict[str, Any], float]] = deque()

    @property
    def size(self) -> int:
        return 1

    def idle(self) -> int:
        return 0 if self._queue else 1

    def submit(self, trial: int, plan: dict[str, Any]) -> None:
        self._queue.append((trial, plan, time.time()))

    def completed(self, timeout: float | None = None) -> list[TrialResult]:
        """Run every queued trial now (``timeout`` is ignored: the driver is the worker)."""
        results = []
        while self._queue:
            trial, plan, submitted_at = self._queue.popleft()
            results.append(run_trial(self._worker, trial, plan, submitted_at, "local"))
        return results

    def close(self) -> None:
        self._queue.clear()
