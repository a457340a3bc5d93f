"""Studies in storage: objectives checked, bad URLs, journal files, orphans, plain Optuna access."""

from __future__ import annotations

import hashlib
import warnings

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from mergesearch.errors import ConfigError, StudyError
from mergesearch.search.optimizers import Optimizer
from mergesearch.search.study import (
    ORPHAN_REASON,
    count_complete,
    mask_url,
    open_study,
    record_trial,
    recover_orphans,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

OBJ = [("acc", "maximize"), ("l1", "minimize")]
SPACE = {"w": FloatDistribution(0.0, 1.0), "d": FloatDistribution(0.1, 1.0)}


def run(study: optuna.Study, n: int) -> Optimizer:
    opt = Optimizer(study, SPACE, name="random", seed=0, options={})
    for t in opt.ask(n):
        opt.tell(t.number, [t.params["w"], t.params["d"]])
    return opt


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_storage_is_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = open_study(None, "job", OBJ, config_fingerprint="abc")
    assert (tmp_path / "job.db").exists()
    assert study.user_attrs["config_fingerprint"] == "abc"
    assert study.metric_names == ["acc", "l1"]


def test_objective_mismatch_leaves_study_unchanged(tmp_path):
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    run(open_study(url, "s", OBJ), 2)
    before = digest(path)
    for other in ([("acc", "minimize"), ("l1", "minimize")], [("acc", "maximize")], [("f", "maximize"), OBJ[1]]):
        with pytest.raises(StudyError, match=r"has objectives \[acc \(maximize\), l1 \(minimize\)\], the config"):
            open_study(url, "s", other)
    assert digest(path) == before
    study = open_study(url, "s", OBJ)
    assert count_complete(study) == 2 and len(study.trials) == 2


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://alice:s3cret@127.0.0.1:1/db",
        "sqlite:////nonexistent-dir-xyz/s.db",
        "nosuchdialect://bob:s3cret@host/db",
        "journal:///nonexistent-dir-xyz/s.log",
    ],
)
def test_bad_storage_url(url):
    with pytest.raises(StudyError, match="cannot open storage") as e:
        open_study(url, "s", OBJ)
    msg = str(e.value)
    assert "s3cret" not in msg and "\n" not in msg
    assert mask_url(url) in msg


def test_mask_url():
    assert mask_url("postgresql://u:p%40ss@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("sqlite:///a/b.db") == "sqlite:///a/b.db"
    assert mask_url("mysql://u@h/db") == "mysql://u@h/db"


def test_missing_study_and_bad_direction(tmp_path):
    with pytest.raises(StudyError, match="no study 'nope'"):
        open_study(str(tmp_path / "j.log"), "nope", OBJ, create=False)
    with pytest.raises(ConfigError, match="'up'"):
        open_study("memory://", "s", [("a", "up")])


@pytest.mark.parametrize("form", ["journal", "path"])
def test_journal_storage_resumes(tmp_path, form):
    path = tmp_path / "s.log"
    url = f"journal://{path}" if form == "journal" else str(path)
    run(open_study(url, "s", OBJ), 3)
    study = open_study(url, "s", OBJ)
    assert count_complete(study) == 3
    run(study, 2)
    assert [t.number for t in open_study(url, "s", OBJ).trials] == [0, 1, 2, 3, 4]


def test_plain_optuna_loads_the_study(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s", OBJ)
    opt = run(study, 2)
    (t,) = opt.ask(1)
    record_trial(study, t.number, spec={"family": "static", "plan": {"method": "ties"}}, worker="w0",
                 timings={"eval": 1.5}, attempts=1)
    opt.tell(t.number, None, error="bad plan")
    plain = optuna.load_study(study_name="s", storage=url)
    assert [d.name for d in plain.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert plain.metric_names == ["acc", "l1"]
    assert len(plain.best_trials) >= 1
    failed = plain.trials[2]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"] == "bad plan"
    assert failed.user_attrs["plan"] == {"method": "ties"} and failed.user_attrs["timings"] == {"eval": 1.5}
    assert failed.user_attrs["family"] == "static" and "candidate" not in failed.user_attrs


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_orphans_are_failed_and_rerun(tmp_path, kind):
    url = str(tmp_path / "s.log") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"
    study = open_study(url, "s", OBJ)
    crashed = study.ask()  # a trial of some other (dead) driver: no driver attr
    crashed.set_user_attr("refine_of", 7)  # what it was enqueued as is kept by its re-run
    crashed.suggest_float("w", 0.0, 1.0)
    crashed.suggest_float("d", 0.1, 1.0)
    mine = Optimizer(study, SPACE, name="random", seed=0, options={}).ask(1)[0]
    assert recover_orphans(study) == 1
    again = open_study(url, "s", OBJ)
    old = again.trials[crashed.number]
    assert old.state == TrialState.FAIL and old.user_attrs["fail_reason"] == ORPHAN_REASON
    assert again.trials[mine.number].state == TrialState.RUNNING  # this process's trial is not stolen
    rerun = Optimizer(again, SPACE, name="tpe", seed=0, options={}).ask(1)[0]
    assert rerun.params == old.params
    assert rerun.user_attrs["refine_of"] == 7 and rerun.user_attrs["rerun_of"] == crashed.number
    assert recover_orphans(again) == 0


