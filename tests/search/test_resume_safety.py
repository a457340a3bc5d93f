"""Resuming safely: a job that changes what a trial means is refused, naming the first difference, and leaves
the study byte-identical; --new-study is the way out; a run that fails before its first result leaves the
storage as it found it."""

from __future__ import annotations

from pathlib import Path

import optuna

from mergesearch.search.study import first_difference
from tests.conftest import make_tiny_llama, write_job
from tests.support.cli import run_cli as _cli


def test_first_difference_names_the_path() -> None:
    a = {"space": {"weight": {"low": 0.0, "high": 1.0}}, "models": ["a", "b"]}
    assert first_difference(a, a) is None
    b = {"space": {"weight": {"low": 0.0, "high": 0.5}}, "models": ["a", "b"]}
    assert first_difference(a, b) == "space.weight.high: 1.0 in the study, 0.5 in the job"
    assert first_difference(a, {**a, "models": ["a"]}) == "models: 2 entries in the study, 1 in the job"


def test_changed_weight_range_is_refused_and_the_study_untouched(tiny_models, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, tiny_models)
    db = tmp_path / "s.db"
    args = ["run", str(job), "--storage", str(db), "--study", "s", "--no-progress", "--trials", "2"]
    assert _cli(args, capsys)[0] == 0
    before = db.read_bytes()
    job.write_text(job.read_text().replace("weight: [0, 1]", "weight: [0, 0.5]"))
    code, _, err = _cli([*args[:-1], "3"], capsys)
    assert code == 1
    assert [line for line in err.splitlines() if "error" in line.lower()] == [err.splitlines()[-1]]
    assert "space.weight.high: 1.0 in the study, 0.5 in the job" in err and "--new-study" in err
    assert db.read_bytes() == before
    # a changed data file is another job too
    job.write_text(job.read_text().replace("weight: [0, 0.5]", "weight: [0, 1]"))
    data = tmp_path / "data" / "reverse_search.jsonl"
    data.write_text(data.read_text().splitlines()[0] + "\n")
    code, _, err = _cli([*args[:-1], "3"], capsys)
    assert code == 1 and "objectives[0].data.sha256" in err
    assert db.read_bytes() == before
    # the way out: a new study in the same storage
    code, _, err = _cli([*args[:4], "--no-progress", "--new-study", "s2", "--trials", "1"], capsys)
    assert code == 0, err
    assert sorted(optuna.get_all_study_names(f"sqlite:///{db}")) == ["s", "s2"]
    code, _, err = _cli([*args[:4], "--no-progress", "--new-study", "s2", "--trials", "1"], capsys)
    assert code == 1 and "already exists" in err


def test_search_settings_do_not_block_a_resume(tiny_models, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, tiny_models)
    args = ["run", str(job), "--storage", str(tmp_path / "s.db"), "--study", "s", "--no-progress"]
    assert _cli([*args, "--trials", "1"], capsys)[0] == 0
    job.write_text(job.read_text().replace("optimizer: random", "optimizer: tpe").replace("seed: 0}", "seed: 3}"))
    code, _, err = _cli([*args, "--trials", "2"], capsys)
    assert code == 0, err


def test_a_run_failing_before_its_first_trial_leaves_no_study(tiny_models, tmp_path: Path, capsys) -> None:
    odd = make_tiny_llama(tmp_path / "odd", seed=5, hidden=16)  # not a fine-tune of the base: workers refuse it
    job = write_job(tmp_path, {**tiny_models, "b": odd})
    db = tmp_path / "new.db"
    code, _, err = _cli(["run", str(job), "--storage", str(db), "--study", "s", "--no-progress"], capsys)
    assert code != 0 and "worker could not start" in err
    assert not db.exists()
    # an existing storage keeps its other studies, and loses only the new, empty one
    good = write_job(tmp_path / "good", tiny_models)
    assert _cli(["run", str(good), "--storage", str(db), "--study", "kept", "--no-progress", "--trials", "1"],
                capsys)[0] == 0
    code, _, _ = _cli(["run", str(job), "--storage", str(db), "--study", "s", "--no-progress"], capsys)
    assert code != 0
    assert optuna.get_all_study_names(f"sqlite:///{db}") == ["kept"]
