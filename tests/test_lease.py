"""The driver lease is taken before the workers start: a second driver is refused at once, before it loads any
model; a run that fails before its first trial gives the lease back exactly as it found it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mergesearch.config import load_config
from mergesearch.search.loop import SearchRun
from mergesearch.search.study import DRIVER_ID, LEASE_ATTR, _delete_study_user_attr
from tests.conftest import write_job
from tests.test_bad_inputs import cli, snapshot

REPO = Path(__file__).resolve().parents[1]

# A python objective whose module, imported when a worker starts, logs the importing process and then blocks
# until the file `go` appears: the first driver stays "loading its workers" for as long as the test needs.
SLOW_START = """import os, time
from pathlib import Path

here = Path(__file__).parent
with open(here / "imports.log", "a") as f:
    f.write(f"{os.getpid()}\\n")
deadline = time.time() + 60
while not (here / "go").exists() and time.time() < deadline:
    time.sleep(0.1)


def norm(model, tokenizer, examples):
    return float(model.lm_head.weight.norm())
"""


def _slow_start_job(root: Path, models: dict[str, Path]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "slow_start.py").write_text(SLOW_START)
    objectives = ("  - {type: python, name: norm, direction: minimize, target: 'slow_start.py:norm'}\n"
                  "  - {type: l1_from_base, name: l1}\n")
    job = write_job(root, models, objectives=objectives)
    job.write_text(job.read_text().replace("seed: 0}", "seed: 0, baselines: false}"))
    return job


def _imports(root: Path) -> list[str]:
    log = root / "imports.log"
    return log.read_text().split() if log.exists() else []


@pytest.mark.slow
def test_second_driver_refused_while_the_first_loads_its_workers(tiny_models, tmp_path: Path, capsys) -> None:
    job = _slow_start_job(tmp_path, tiny_models)
    url = f"sqlite:///{tmp_path / 'l.db'}"
    argv = ["run", str(job), "--storage", url, "--study", "l", "--trials", "2", "--executor", "local",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "mergesearch.cli", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _imports(tmp_path) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _imports(tmp_path) == [str(first.pid)], first.stderr.read() if first.poll() is not None else ""
        # the first driver is inside its worker's start-up now; a second one on the same study
        start = time.monotonic()
        code, err = cli(argv, capsys)
        took = time.monotonic() - start
        assert code == 1 and len(err) == 1 and "being run by another driver" in err[0], err
        assert f":{first.pid}," in err[0]  # the driver named: host:pid
        assert _imports(tmp_path) == [str(first.pid)]  # the second driver started no worker
        assert took < 30, took  # at once: the slow worker start would hold it for up to 60 s
        (tmp_path / "go").touch()
        _, stderr = first.communicate(timeout=180)
        assert first.returncode == 0, stderr
    finally:
        (tmp_path / "go").touch()
        if first.poll() is None:
            first.kill()
            first.wait()
    study = optuna.load_study(study_name="l", storage=url)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    assert study.user_attrs[LEASE_ATTR]["released"] is True


@pytest.fixture
def stored(tiny_models, tmp_path: Path, capsys) -> tuple[Path, Path]:
    """(job, SQLite file) of a study 's' with one completed trial, run through the CLI."""
    job = write_job(tmp_path, tiny_models)
    db = tmp_path / "s.db"
    code, err = cli(["run", str(job), "--storage", str(db), "--study", "s", "--trials", "1", "--no-progress"], capsys)
    assert code == 0, err
    return job, db


@pytest.mark.parametrize("before", ["released", "absent"])
def test_lease_taken_before_workers_is_given_back_as_it_was(stored: tuple[Path, Path], before: str) -> None:
    job, db = stored
    url = f"sqlite:///{db}"
    if before == "absent":  # a study run by another tool (or an older mergesearch): no lease attr at all
        assert _delete_study_user_attr(optuna.load_study(study_name="s", storage=url), LEASE_ATTR)
    found = snapshot(db)
    assert (LEASE_ATTR in found["s"]["user_attrs"]) == (before == "released")
    run = SearchRun(load_config(job), storage=url, study_name="s", trials=3)
    run.take_lease()
    lease = optuna.load_study(study_name="s", storage=url).user_attrs[LEASE_ATTR]
    assert lease["owner"] == DRIVER_ID and not lease["released"]
    assert run.lease.running  # refreshed while the workers load
    # ... the workers fail to start (a broken model, Ctrl-C): the CLI calls abandon
    assert run.abandon() is False
    assert not run.lease.running
    assert snapshot(db) == found


def test_a_job_with_another_meaning_takes_no_lease(stored: tuple[Path, Path]) -> None:
    job, db = stored
    job.write_text(job.read_text().replace("weight: [0, 1]", "weight: [0, 0.5]"))
    before = db.read_bytes()
    run = SearchRun(load_config(job), storage=f"sqlite:///{db}", study_name="s", trials=3)
    run.take_lease()  # prepare() refuses this job once the workers have started: nothing may be written
    assert not run.lease.held and not run.lease.running
    run.abandon()
    assert db.read_bytes() == before
