"""SIGTERM stops a run as Ctrl-C does, at any moment: during Ray's start-up and during trials. Exit 143 within
10 s, no traceback or stack dump, every in-flight trial re-queued (none left RUNNING), no Ray process of the
run alive, and a new study stopped before its first result leaves no storage behind; a re-run then ends with
exactly the requested number of completed trials."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from tests.test_faults import REPO, _slow_job

TARGET = 5


def _states(db: Path) -> list[str]:
    try:
        return [t.state.name for t in optuna.load_study(study_name="k", storage=f"sqlite:///{db}").trials]
    except Exception:  # not created yet, or busy
        return []


def _stop(job: Path, db: Path, ready) -> tuple[int, float, str, list[psutil.Process]]:
    """Start `mergesearch run` on Ray, wait until ``ready(descendants)``, SIGTERM it; returns (exit code,
    seconds to exit, stderr, every process it had spawned)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "mergesearch.cli", "run", str(job), "--storage", str(db), "--study", "k",
            "--trials", str(TARGET), "--executor", "ray", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                seen.update(psutil.Process(proc.pid).children(recursive=True))
            if ready(seen):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        return proc.returncode, time.monotonic() - t0, proc.stderr.read(), list(seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:80])
        except psutil.Error:
            pass
    return out


def _raylet_up(procs: set[psutil.Process]) -> bool:
    for p in procs:
        try:
            if "raylet" in p.name() or "gcs_server" in p.name():
                return True
        except psutil.Error:
            pass
    return False


@pytest.mark.slow
def test_sigterm_during_startup_and_trials(tiny_models, tmp_path: Path, capsys) -> None:
    job = _slow_job(tmp_path, tiny_models)
    db = tmp_path / "k.db"

    # 1. during Ray's start-up: the new study is not left behind
    code, took, err, procs = _stop(job, db, _raylet_up)
    assert code == 143, err[-2000:]
    assert took < 10, took
    assert "Traceback" not in err and "Fatal" not in err and "Stack" not in err, err[-2000:]
    assert "terminated (SIGTERM)" in err
    assert procs and not _alive(procs)
    assert not db.exists()

    # 2. during trials: every in-flight trial failed and re-queued
    code, took, err, procs = _stop(job, db, lambda _: _states(db).count("RUNNING") >= 1
                                   and "COMPLETE" in _states(db))
    assert code == 143, err[-2000:]
    assert took < 10, took
    assert "Traceback" not in err and "Fatal" not in err, err[-2000:]
    assert procs and not _alive(procs), _alive(procs)
    states = _states(db)
    assert "RUNNING" not in states
    interrupted = [t for t in optuna.load_study(study_name="k", storage=f"sqlite:///{db}").trials
                   if t.user_attrs.get("fail_reason") == "interrupted (run stopped)"]
    assert interrupted and states.count("WAITING") == len(interrupted)

    # 3. the same command (locally, quicker) ends with exactly the requested count
    from mergesearch.cli import main

    try:
        main(["run", str(job), "--storage", str(db), "--study", "k", "--trials", str(TARGET), "--executor",
              "local", "--no-progress"])
    except SystemExit as e:
        assert not e.code
    states = _states(db)
    assert states.count("COMPLETE") == TARGET and "RUNNING" not in states and "WAITING" not in states
