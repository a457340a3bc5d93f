"""Progress of a search run: a live bar on a terminal, plain lines elsewhere (logs, CI, ``ray job submit``).

Both show trials done/failed/running (and pruned, with fidelity rungs), examples scored (of
``search.max_examples`` if set), elapsed time, an ETA, the hypervolume (the same value ``front`` prints:
both read the study's stored reference point) and the best value per objective, by name. A live bar
redrawn with carriage returns is unreadable in a log file and gets cut at the log's width, so off a
terminal one self-contained line is printed every ``every_trials`` results or ``every_seconds`` seconds,
whichever comes first, and once at the end.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mergesearch.execution.base import TrialResult

if TYPE_CHECKING:
    from mergesearch.search.loop import SearchRun


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunProgress:
    """Context manager showing progress while ``SearchRun.run`` works; feed it each result.

    Args:
        run: the search run (its study, target, objectives and :attr:`~SearchRun.running` count).
        console: where to write (default: stderr); a terminal gets the live bar, anything else plain lines.
        hv_every: seconds between hypervolume recomputations (it reads every stored trial).
        every_trials: plain mode: a line after this many results (default: a tenth of the target, at least 1).
        every_seconds: plain mode: a line at least this often, results or not.
    """

    def __init__(self, run: SearchRun, console: Console | None = None, hv_every: float = 2.0,
                 every_trials: int | None = None, every_seconds: float = 30.0) -> None:
        self.run = run
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.failed = self.pruned = 0
        self.hv_every = hv_every
        self._hv_at = 0.0
        self._hv: tuple[float, float | None] | None = None
        self.start_done = min(run.completed_count(), run.target)
        self.done = self.start_done
        self.every_trials = every_trials or max(1, run.target // 10)
        self.every_seconds = every_seconds
        self._since_line = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._t0 = time.monotonic()
        self._last_line = self._t0
        # read from storage once; each result then updates it (no per-trial scan of all stored trials)
        self.best = run.best()
        self.directions = dict(run.objectives)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[stats]}"), console=self.console, transient=False,
        ) if self.live else None
        self.task = self.progress.add_task(run.study_name, total=run.target, completed=self.start_done,
                                           stats="") if self.progress else None

    def __enter__(self) -> RunProgress:
        self._t0 = self._last_line = time.monotonic()
        if self.progress is not None:
            self.progress.start()
        else:
            self._ticker = threading.Thread(target=self._tick, name="RunProgress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        shown = self._hv
        self._hypervolume(force=True)  # the last value shown is the one `front` prints
        if self.progress is not None:
            self.progress.update(self.task, stats=self.stats())
            self.progress.stop()
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._since_line or self._hv != shown or self.done == self.start_done:
            self._print_line()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last_line >= self.every_seconds:
                self._print_line()

    def _hypervolume(self, force: bool = False) -> tuple[float, float | None] | None:
        now = time.monotonic()
        if force or now - self._hv_at > self.hv_every:  # recomputed at most every few seconds
            self._hv, self._hv_at = self.run.hypervolume_pair(), now
        return self._hv

    def stats(self) -> str:
        """``failed=1 running=2 examples=960 eta=3m05s hv=0.41 (raw 12.3) best: reverse=0.81 l1=0.0031``."""
        elapsed = time.monotonic() - self._t0
        new = self.done - self.start_done
        left = self.run.target - self.done
        eta = f" eta={_duration(elapsed / new * left)}" if new and left > 0 else ""
        hv = self._hypervolume()
        hv_text = ""
        if hv is not None:
            raw, norm = hv
            hv_text = f" hv={norm:.3g} (raw {raw:.4g})" if norm is not None else f" hv={raw:.4g}"
        best = " ".join(f"{k}={v:.4g}" for k, v in self.best.items())
        search = self.run.config.search
        pruned = f" pruned={self.pruned}" if search.fidelity is not None else ""
        budget = f"/{search.max_examples}" if search.max_examples is not None else ""
        examples = f" examples={self.run.examples}{budget}" if self.run.examples or budget else ""
        queued = f" queued={self.run.queued}" if self.run.queued else ""
        return f"failed={self.failed}{pruned} running={self.run.running}{queued}{examples}{eta}{hv_text} best: {best}"

    def line(self) -> str:
        """One self-contained plain progress line."""
        elapsed = time.monotonic() - self._t0
        return f"[{self.run.study_name}] {self.done}/{self.run.target} done, {_duration(elapsed)}, {self.stats()}"

    def _print_line(self) -> None:
        with self._lock:
            self._hypervolume(force=True)  # lines are rare: each shows the current value
            self.console.print(self.line(), highlight=False, markup=False, soft_wrap=True)
            self._last_line = time.monotonic()
            self._since_line = 0

    def __call__(self, result: TrialResult) -> None:
        if result.ok and result.values is not None:
            self.done += 1
            for name, value in result.values.items():
                pick = max if self.directions[name] == "maximize" else min
                self.best[name] = pick(self.best.get(name, value), value)
        elif result.pruned:
            self.pruned += 1
        else:
            self.failed += 1
        if self.progress is not None:
            if result.ok:
                self.progress.advance(self.task)
            self.progress.update(self.task, stats=self.stats())
            return
        self._since_line += 1
        if self._since_line >= self.every_trials:
            self._print_line()
