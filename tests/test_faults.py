"""Fault injection: a driver killed with SIGKILL and resumed, two drivers on one study, a full disk on export.

Two-driver policy (see docs/reliability.md): one live driver per study. The running driver holds a lease in
the study (user attr ``driver_lease``, refreshed every few seconds); a second ``run`` is refused with a clear
message while the lease is fresh; a killed driver's lease is taken over at once on the same host (its pid is
gone) or after it has gone stale elsewhere, and every trial it left RUNNING is failed and re-queued.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from mergesearch.search.study import ORPHAN_REASON
from tests.conftest import write_job
from tests.test_bad_inputs import cli, sha

REPO = Path(__file__).resolve().parents[1]
SLOW = ("import time\n\ndef slow(model, tokenizer, examples):\n    time.sleep(0.5)\n"
        "    return float(model.lm_head.weight.norm())\n")


def _slow_job(root: Path, models: dict[str, Path]) -> Path:
    (root / "slow_objective.py").parent.mkdir(parents=True, exist_ok=True)
    (root / "slow_objective.py").write_text(SLOW)
    objectives = ("  - {type: python, name: norm, direction: minimize, target: 'slow_objective.py:slow'}\n"
                  "  - {type: l1_from_base, name: l1}\n")
    return write_job(root, models, objectives=objectives)


def _trials(url: str | BaseStorage, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception:  # not created yet, or busy
        return []


def _count(trials, state: TrialState) -> int:
    return sum(t.state == state for t in trials)


def _running_by(trials, pid: int) -> int:
    """RUNNING trials created by the driver process ``pid`` (user attr ``driver`` = host:pid:uuid). An orphan a
    killed driver left RUNNING does not count: until the next driver has taken the lease (slow to start on a busy
    machine), a second driver may rightly take the study over."""
    return sum(t.state == TrialState.RUNNING and str(t.user_attrs.get("driver", "")).split(":")[1:2] == [str(pid)]
               for t in trials)


@pytest.mark.slow
def test_sigkill_and_resume_exact_count_and_second_driver_refused(tiny_models, tmp_path, capsys) -> None:
    kill_resume_and_second_driver(tiny_models, tmp_path, capsys, f"sqlite:///{tmp_path / 'k.db'}")


def kill_resume_and_second_driver(models: dict[str, Path], root: Path, capsys, url: str, *, kills: int = 3,
                                  target: int = 10, poll: str | BaseStorage | None = None,
                                  resume_in_process: bool = False) -> None:
    """SIGKILL a real ``mergesearch run`` on study ``k`` in ``url`` ``kills`` times mid-study (a second driver,
    started while the first one runs a trial, is refused at once), then re-run the same command: exactly
    ``target`` trials complete, none is left RUNNING. ``poll``: the storage the test reads the trials from
    (default ``url``); ``resume_in_process``: the re-run calls the CLI in this process (saves an interpreter
    start-up). Shared with the PostgreSQL version (tests/search/test_postgres.py)."""
    job = _slow_job(root, models)
    poll = poll or url
    argv = ["run", str(job), "--storage", url, "--study", "k", "--trials", str(target), "--executor", "local",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    rng = random.Random(7)
    killed, second_checked = 0, False
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            start_complete = _count(_trials(poll, "k"), TrialState.COMPLETE)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                trials = _trials(poll, "k")
                if not second_checked and _running_by(trials, proc.pid):
                    # (b) a second driver while the first is alive: refused, study untouched by it
                    t0 = time.monotonic()
                    code, err = cli(argv, capsys)
                    assert code != 0 and len(err) == 1 and "being run by another driver" in err[0], err
                    assert time.monotonic() - t0 < 30  # refused at once, not after waiting for the lease
                    second_checked = True
                if _count(trials, TrialState.COMPLETE) > start_complete:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))  # land anywhere: merging, scoring, or writing to the storage
            if killed == kills - 1:  # the last kill lands mid-trial (a trial RUNNING), so one orphan is certain
                wait_until = time.monotonic() + 30
                while not _running_by(_trials(poll, "k"), proc.pid) and time.monotonic() < wait_until:
                    time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert killed == kills
    assert second_checked
    assert _count(_trials(poll, "k"), TrialState.COMPLETE) < target
    if resume_in_process:
        code, err = cli(argv, capsys)
        assert code == 0, err
    else:
        res = subprocess.run([sys.executable, "-m", "mergesearch.cli", *argv], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
    trials = _trials(poll, "k")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == target  # exactly the requested trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]  # none left running
    assert len({t.number for t in complete}) == target
    reruns = [t.user_attrs["rerun_of"] for t in complete if "rerun_of" in t.user_attrs]
    assert len(reruns) == len(set(reruns))  # no orphan completed twice
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs.get("fail_reason") for t in failed)
    orphans = [t for t in failed if t.user_attrs["fail_reason"] == ORPHAN_REASON]
    assert orphans  # kills landed mid-trial
    # every completed trial is stored whole: plan, worker, timings
    assert all({"plan", "worker", "timings"} <= set(t.user_attrs) for t in complete)


def _set_lease(url: str, owner: str, age: float) -> None:
    study = optuna.load_study(study_name="l", storage=url)
    study.set_user_attr("driver_lease", {"owner": owner, "time": time.time() - age, "released": False})


def test_lease_fresh_remote_refused_stale_taken_over(tiny_job, tmp_path, capsys) -> None:
    db = tmp_path / "l.db"
    url = f"sqlite:///{db}"
    argv = ["run", str(tiny_job), "--storage", url, "--study", "l", "--trials", "1", "--no-progress"]
    assert cli(argv, capsys)[0] == 0
    argv[argv.index("--trials") + 1] = "2"
    _set_lease(url, "otherhost:4242:cafe", age=5)
    before = sha(db)
    code, err = cli(argv, capsys)
    assert code != 0 and len(err) == 1
    assert re.search(r"being run by another driver \(otherhost:4242, seen \d+s ago\)", err[0])  # ~5 s, load-dependent
    assert sha(db) == before
    _set_lease(url, "otherhost:4242:cafe", age=3600)  # stale: its driver is gone
    code, err = cli(argv, capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="l", storage=url)
    assert _count(study.trials, TrialState.COMPLETE) == 2
    assert study.user_attrs["driver_lease"]["released"] is True  # a clean stop frees the lease
    # a killed driver on this host (pid gone) is taken over at once, however fresh its lease
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _set_lease(url, f"{socket.gethostname()}:{dead.pid}:dead", age=0)
    argv[argv.index("--trials") + 1] = "3"
    code, err = cli(argv, capsys)
    assert code == 0, err


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_disk_full_while_exporting_leaves_nothing(tiny_job, tmp_path, capsys, monkeypatch) -> None:
    """A real full disk (a 64 KiB tmpfs; the model needs ~100 KiB) when permitted, else ENOSPC raised by the
    last write of the export (the recipe), after the weights were written."""
    url = f"sqlite:///{tmp_path / 'e.db'}"
    code, _ = cli(["run", str(tiny_job), "--storage", url, "--study", "e", "--trials", "1", "--no-progress"], capsys)
    assert code == 0
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "64k")
    if not mounted:
        import mergesearch.merging.run as merge_run

        def full(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(disk / "model" / "recipe.yaml"))

        monkeypatch.setattr(merge_run, "write_recipe", full)
    try:
        out = disk / "model"
        code, err = cli(["pick", "--storage", url, "--study", "e", "--out", str(out)], capsys)
        assert code != 0
        errors = [line for line in err if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], err
        assert "Traceback" not in "\n".join(err)
        assert not out.exists() or not any(out.iterdir())
        assert list(disk.iterdir()) == []  # no temp directory left behind
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)
