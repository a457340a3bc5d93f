"""Inspecting a study from the CLI: `show`, `export --trial`, `studies`, `front --format json` with params and
recipe, a job YAML as the only argument, a plain SQLite path as --storage, and the CLI's conventions."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from mergesearch.cli import main
from tests.conftest import write_job
from tests.support.cli import run_cli as _cli


@pytest.fixture(scope="module")
def job(tiny_models, tmp_path_factory) -> Path:
    """A job naming its storage (a plain SQLite file path) and study, run for 4 trials, the first one a partial
    recipe."""
    root = tmp_path_factory.mktemp("inspect")
    path = write_job(root, tiny_models, extra=f"storage: {root / 'jobs.db'}\nstudy: inspected\n")
    path.write_text(path.read_text().replace("seed: 0}", "seed: 0, initial: [{method: ties}]}"))
    try:
        main(["run", str(path), "--no-progress"])
    except SystemExit as e:
        assert not e.code
    return path


def _failed_trial(job: Path) -> int:
    """Add a failed trial with a stored plan (as the loop records one) and return its number."""
    study = optuna.load_study(study_name="inspected", storage=f"sqlite:///{job.parent / 'jobs.db'}")
    first = study.trials[0]
    t = study.ask(fixed_distributions=first.distributions)
    t.set_user_attr("plan", first.user_attrs["plan"])
    t.set_user_attr("fail_reason", "reverse: score is NaN")
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    return t.number


def test_show_prints_scores_params_by_model_recipe_and_state(job: Path, capsys) -> None:
    code, out, err = _cli(["show", str(job), "--trial", "0"], capsys)
    assert code == 0, err
    assert "trial 0 of study 'inspected': COMPLETE (recipe)" in out
    assert "scores: reverse=" in out and "sort_ll=" in out and "l1=" in out
    # parameters named by model folder, not by index
    assert "weight[a]: 1" in out and "density[b]: 1" in out and "weight.0" not in out
    recipe = yaml.safe_load(out.split("recipe:\n", 1)[1].split("worker:", 1)[0])
    assert recipe["merge_method"] == "ties"
    assert len(recipe["models"]) == 2


def test_show_json_and_a_failed_trial_gives_its_reason(job: Path, capsys) -> None:
    number = _failed_trial(job)
    code, out, _ = _cli(["show", str(job), "--trial", str(number), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["state"] == "FAIL" and data["fail_reason"] == "reverse: score is NaN" and data["values"] is None
    assert data["recipe"]["merge_method"] == "ties"
    code, out, _ = _cli(["show", str(job), "--trial", str(number)], capsys)
    assert f"trial {number} of study 'inspected': FAIL: reverse: score is NaN" in out


def test_show_unknown_trial_is_one_line(job: Path, capsys) -> None:
    code, _, err = _cli(["show", str(job), "--trial", "999"], capsys)
    assert code == 1 and err.count("\n") == 1 and "has no trial 999" in err


def test_export_any_trial_by_number(job: Path, tmp_path: Path, capsys) -> None:
    study = optuna.load_study(study_name="inspected", storage=f"sqlite:///{job.parent / 'jobs.db'}")
    front = {t.number for t in study.best_trials}
    dominated = [t.number for t in study.trials if t.state.name == "COMPLETE" and t.number not in front]
    number = dominated[0] if dominated else 1
    code, out, err = _cli(["export", str(job), "--trial", str(number), "--out", str(tmp_path / "m")], capsys)
    assert code == 0, err
    assert f"exported trial {number}" in out
    assert "merging trial" in err  # progress lines on stderr
    scores = json.loads((tmp_path / "m" / "scores.json").read_text())
    assert scores["trial"] == number and scores["state"] == "COMPLETE"
    assert scores["values"] == dict(zip(["reverse", "sort_ll", "l1"], study.trials[number].values, strict=True))
    assert (tmp_path / "m" / "recipe.yaml").is_file()


def test_studies_lists_names_counts_and_objectives(job: Path, tmp_path: Path, capsys) -> None:
    db = job.parent / "jobs.db"
    code, out, err = _cli(["studies", "--storage", str(db)], capsys)  # a plain file path is SQLite
    assert code == 0, err
    assert "inspected: " in out and "complete of" in out and "objectives: reverse ↑, sort_ll ↑, l1 ↓" in out
    code, out, _ = _cli(["studies", str(job), "--json"], capsys)
    (entry,) = json.loads(out)
    assert entry["name"] == "inspected" and entry["counts"]["complete"] >= 4
    assert entry["objectives"] == [["reverse", "maximize"], ["sort_ll", "maximize"], ["l1", "minimize"]]
    code, _, err = _cli(["studies", "--storage", str(tmp_path / "none.db")], capsys)
    assert code == 1 and "storage file not found" in err and not (tmp_path / "none.db").exists()


def test_front_and_pick_take_the_job_yaml_alone(job: Path, capsys) -> None:
    code, out, err = _cli(["front", str(job), "--format", "json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["study"] == "inspected"
    point = data["front"][0]
    assert point["params"] and point["recipe"]["merge_method"] in ("ties", "task_arithmetic")
    code, out, err = _cli(["pick", str(job)], capsys)
    assert code == 0, err
    assert "trial" in out


def test_storage_accepts_a_plain_sqlite_path(job: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(job.parent)
    code, out, err = _cli(["front", "--storage", "jobs.db", "--study", "inspected", "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(out)["study"] == "inspected"


def test_no_study_named_is_one_line(capsys) -> None:
    code, _, err = _cli(["front"], capsys)
    assert code == 2 and "name a study" in err


def test_cli_conventions(job: Path, capsys) -> None:
    code, out, _ = _cli(["--version"], capsys)
    assert code == 0 and out.startswith("mergesearch ")
    code, out, _ = _cli(["pick", "-h"], capsys)
    assert code == 0 and "--overwrite " in out and "<bool>" not in out and "--no-overwrite" not in out
    # --debug after the subcommand: accepted, and the error then keeps its traceback
    from mergesearch.errors import StudyError

    with pytest.raises(StudyError):
        main(["show", str(job), "--trial", "999", "--debug"])
