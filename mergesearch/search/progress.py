"""A rich progress display for a search run: trials done/failed, elapsed, hypervolume, best per objective."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergesearch.execution.base import TrialResult

if TYPE_CHECKING:
    from mergesearch.search.loop import SearchRun


class RunProgress:
    """Context manager showing a live bar while ``SearchRun.run`` works; feed it each result."""

    def __init__(self, run: SearchRun, console: Console | None = None, hv_every: float = 2.0) -> None:
        self.run = run
        self.failed = 0
        self.hv_every = hv_every
        self._hv_at = 0.0
        self._hv: float | None = None
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"), console=console or Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task(run.study_name, total=run.target,
                                           completed=min(run.completed_count(), run.target), stats="")

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, result: TrialResult) -> None:
        if not result.ok:
            self.failed += 1
        now = time.monotonic()
        if now - self._hv_at > self.hv_every:  # hypervolume is recomputed at most every few seconds
            self._hv, self._hv_at = self.run.hypervolume(), now
        best = " ".join(f"{k}={v:.3g}" for k, v in self.run.best().items())
        hv = f"hv={self._hv:.4g} " if self._hv is not None else ""
        self.progress.update(self.task, completed=min(self.run.completed_count(), self.run.target),
                             stats=f"failed={self.failed} {hv}{best}")
