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
        # read from storage once; each result then updates it (no per-trial scan of all stored trials)
        self.best = run.best()
        self.directions = dict(run.objectives)

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, result: TrialResult) -> None:
        if result.ok and result.values is not None:
            self.progress.advance(self.task)
            for name, value in result.values.items():
                pick = max if self.directions[name] == "maximize" else min
                self.best[name] = pick(self.best.get(name, value), value)
        else:
            self.failed += 1
        now = time.monotonic()
        if now - self._hv_at > self.hv_every:  # hypervolume is recomputed at most every few seconds
            self._hv, self._hv_at = self.run.hypervolume(), now
        best = " ".join(f"{k}={v:.3g}" for k, v in self.best.items())
        hv = f"hv={self._hv:.4g} " if self._hv is not None else ""
        self.progress.update(self.task, stats=f"failed={self.failed} {hv}{best}")
