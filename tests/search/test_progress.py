"""Progress off a terminal: one self-contained line every N results or every few seconds, never a redrawn bar."""

from __future__ import annotations

import io
import time
from types import SimpleNamespace

from rich.console import Console

from mergesearch.execution.base import TrialResult
from mergesearch.search.progress import RunProgress


class _Run:
    """What RunProgress reads from a SearchRun."""

    study_name = "s"
    target = 10
    objectives = (("acc", "maximize"), ("l1", "minimize"))
    running = 2
    queued = 0
    examples = 0
    config = SimpleNamespace(search=SimpleNamespace(fidelity=None, max_examples=None))

    def completed_count(self) -> int:
        return 0

    def best(self) -> dict[str, float]:
        return {}

    def hypervolume_pair(self) -> tuple[float, float | None]:
        return 1.5, 0.25


def _result(i: int) -> TrialResult:
    return TrialResult(i, {"acc": 0.1 * i, "l1": 10.0 - i}, None, "w")


def test_plain_lines_every_n_results_with_names_eta_and_hypervolume() -> None:
    out = io.StringIO()
    with RunProgress(_Run(), console=Console(file=out, force_terminal=False, width=60), every_trials=3,
                     every_seconds=1000) as bar:
        for i in range(7):
            bar(_result(i))
    lines = out.getvalue().splitlines()
    assert [line.split(" done")[0] for line in lines] == ["[s] 3/10", "[s] 6/10", "[s] 7/10"]  # + the last one
    assert "\r" not in out.getvalue()
    assert "running=2 " in lines[0] and "eta=" in lines[0] and "hv=0.25 (raw 1.5)" in lines[0]
    assert "queued=" not in out.getvalue(), "shown only with trials sampled ahead (execution.prefetch)"
    assert "best: acc=0.5 l1=5" in lines[1]  # by name, the best so far per direction
    assert all(len(line) > 60 for line in lines)  # never cut at the console's width


def test_trials_sampled_ahead_are_shown_as_queued_not_running() -> None:
    out, run = io.StringIO(), _Run()
    run.running, run.queued = 16, 16
    with RunProgress(run, console=Console(file=out, force_terminal=False), every_trials=1, every_seconds=1000) as bar:
        bar(_result(0))
    assert "running=16 queued=16 " in out.getvalue()


def test_plain_line_after_every_seconds_without_results() -> None:
    out = io.StringIO()
    with RunProgress(_Run(), console=Console(file=out, force_terminal=False), every_trials=100,
                     every_seconds=1.0):
        time.sleep(2.5)
    assert out.getvalue().count("[s] 0/10 done") >= 2


def test_fidelity_runs_show_pruned_trials_and_the_examples_budget() -> None:
    run = _Run()
    run.config = SimpleNamespace(search=SimpleNamespace(fidelity=object(), max_examples=100))
    out = io.StringIO()
    with RunProgress(run, console=Console(file=out, force_terminal=False), every_trials=2,
                     every_seconds=1000) as bar:
        bar(_result(1))
        run.examples = 40
        bar(TrialResult(2, None, None, "w", rungs=[{"acc": 0.1, "l1": 3.0}], examples=8, pruned=True))
    first = out.getvalue().splitlines()[0]
    # a pruned trial is neither done nor failed
    assert first.startswith("[s] 1/10 done") and "failed=0 pruned=1" in first and "examples=40/100" in first
