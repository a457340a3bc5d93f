"""`mergesearch run`: studies in storage that resume, failures recorded, mismatches refused."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import optuna
import pytest

from mergesearch.cli import main
from mergesearch.config import load_config
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.worker import MergeWorkerFactory
from mergesearch.search.loop import SearchRun
from tests.conftest import write_job


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _states(url: str, name: str) -> dict[str, int]:
    study = optuna.load_study(study_name=name, storage=url)
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_trials_is_a_target_and_rerun_resumes(tiny_job: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["run", str(tiny_job), "--storage", url, "--study", "s", "--no-progress"]
    assert _run([*args, "--trials", "3"]) == 0
    assert _states(url, "s") == {"COMPLETE": 3}
    # the same command again: the study is complete, nothing new is evaluated
    assert _run([*args, "--trials", "3"]) == 0
    assert _states(url, "s") == {"COMPLETE": 3}
    # a larger target continues the same study
    assert _run([*args, "--trials", "5"]) == 0
    study = optuna.load_study(study_name="s", storage=url)  # plain optuna (and optuna-dashboard) reads it
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    assert study.metric_names == ["reverse", "sort_ll", "l1"]
    assert all("plan" in t.user_attrs and "worker" in t.user_attrs for t in study.trials)
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == 5  # the resumed optimizer did not replay its start-up points


def test_initial_presets_run_first_and_plans_are_stored(tiny_models, tmp_path: Path) -> None:
    job = write_job(tmp_path, tiny_models, extra="")
    text = job.read_text().replace("seed: 0}", "seed: 0, initial: [uniform, ties_default]}")
    job.write_text(text)
    run = SearchRun(load_config(job), storage=f"sqlite:///{tmp_path / 'i.db'}", study_name="i", trials=3)
    pool = LocalExecutor(MergeWorkerFactory(run.config))
    report = run.run(pool)
    assert report.completed == 3
    first, second = run.study.trials[:2]
    assert first.user_attrs["plan"]["merge_method"] == "task_arithmetic"
    weights = [m["parameters"]["weight"] for m in first.user_attrs["plan"]["models"]]
    assert weights == pytest.approx([0.5, 0.5])
    assert second.user_attrs["plan"]["merge_method"] == "ties"


def test_refine_polishes_the_front_in_the_last_trials(tiny_models, tmp_path: Path) -> None:
    from mergesearch.search.unit import to_unit

    job = write_job(tmp_path, tiny_models, extra="")
    job.write_text(job.read_text().replace("seed: 0}", "seed: 0, initial: [uniform], refine: 3, refine_step: 0.01}"))
    run = SearchRun(load_config(job), storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r", trials=5)
    assert run.run(LocalExecutor(MergeWorkerFactory(run.config))).completed == 5
    trials = run.study.trials
    assert trials[0].user_attrs["initial"] is True and "refine_of" not in trials[1].user_attrs
    refined = trials[2:]
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert [t.user_attrs["refine_of"] < t.number for t in refined] == [True] * 3
    for t in refined:  # a small move of its parent, same method
        parent = trials[t.user_attrs["refine_of"]]
        assert t.params["method"] == parent.params["method"]
        moved = to_unit(t.params, run.space.distributions) - to_unit(parent.params, run.space.distributions)
        assert 0 < np.abs(moved).max() < 0.1
    # the recipe is refined first unless the random trial strictly dominates it (then that one is)
    sign = np.array([-1.0, -1.0, 1.0])  # reverse, sort_ll maximised; l1 minimised
    a, b = sign * trials[0].values, sign * trials[1].values
    assert refined[0].user_attrs["refine_of"] == (1 if np.all(b <= a) and np.any(b < a) else 0)
    # the front says where its trials came from (the random trial 1 has no origin)
    from mergesearch.search.pareto import front_to_json, load_front, render_table

    front = load_front(run.study)
    origin = {t.number: t.origin for t in front.trials}
    expected = {0: "recipe", 1: "", **{t.number: f"refines #{t.user_attrs['refine_of']}" for t in refined}}
    assert origin == {n: expected[n] for n in origin}
    text = render_table(front, width=200)
    assert all(f"({o})" in text for o in origin.values() if o)
    assert {e["trial"]: e.get("origin", "") for e in front_to_json(front)["front"]} == origin


def test_ctrl_c_leaves_a_resumable_study(tiny_models, tmp_path: Path) -> None:
    class Interrupted(LocalExecutor):
        """Ctrl-C while the fourth trial is in flight."""

        def completed(self, timeout: float | None = None) -> list:
            if self.calls == 3:
                raise KeyboardInterrupt
            self.calls += 1
            return super().completed(timeout)

    job = write_job(tmp_path, tiny_models, extra="")
    # no reference rows: their results would go through the completed() calls counted above
    job.write_text(job.read_text().replace("seed: 0}", "seed: 0, initial: [uniform], refine: 2, baselines: false}"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    run = SearchRun(load_config(job), storage=url, study_name="c", trials=4)
    pool = Interrupted(MergeWorkerFactory(run.config))
    pool.calls = 0
    report = run.run(pool)
    assert report.interrupted and report.completed == 3
    cut = run.study.trials[3]
    assert cut.state.name == "FAIL" and cut.user_attrs["fail_reason"] == "interrupted (run stopped)"
    again = SearchRun(load_config(job), storage=url, study_name="c", trials=4)
    assert again.run(LocalExecutor(MergeWorkerFactory(again.config))).completed == 4
    trials = again.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    # the interrupted refinement ran again, as a refinement of the same parent
    assert trials[4].params == cut.params and trials[4].user_attrs["refine_of"] == cut.user_attrs["refine_of"]


def test_failing_candidates_are_stored_with_reasons(tiny_models, tmp_path: Path, monkeypatch) -> None:
    from tests.support import objective_fns

    objectives = (
        "  - {type: python, name: emb, target: 'tests.support.objective_fns:nan_for_heavy'}\n"
        "  - {type: l1_from_base, name: l1}\n"
    )
    job = write_job(tmp_path, tiny_models, objectives=objectives)
    monkeypatch.setattr(objective_fns.nan_for_heavy, "threshold", 0.0)  # every candidate is NaN
    run = SearchRun(load_config(job), storage=f"sqlite:///{tmp_path / 'f.db'}", study_name="f", trials=2)
    from mergesearch.errors import StudyError

    with pytest.raises(StudyError, match="failed in a row"):
        run.run(LocalExecutor(MergeWorkerFactory(run.config)), max_consecutive_failures=3)
    failed = run.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 3
    assert all("emb" in t.user_attrs["fail_reason"] and "nan" in t.user_attrs["fail_reason"] for t in failed)
    # the study still resumes: with a finite objective the same study completes
    monkeypatch.setattr(objective_fns.nan_for_heavy, "threshold", math.inf)
    run2 = SearchRun(load_config(job), storage=f"sqlite:///{tmp_path / 'f.db'}", study_name="f", trials=2)
    assert run2.run(LocalExecutor(MergeWorkerFactory(run2.config))).completed == 2
    assert _states(f"sqlite:///{tmp_path / 'f.db'}", "f") == {"FAIL": 3, "COMPLETE": 2}


def test_changed_objectives_are_refused_and_study_unchanged(tiny_models, tmp_path: Path, capsys) -> None:
    db = tmp_path / "m.db"
    url = f"sqlite:///{db}"
    job = write_job(tmp_path, tiny_models)
    assert _run(["run", str(job), "--storage", url, "--study", "m", "--trials", "2", "--no-progress"]) == 0
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    capsys.readouterr()
    other = write_job(tmp_path / "other", tiny_models, objectives="  - {type: l1_from_base, name: l1}\n")
    code = _run(["run", str(other), "--storage", url, "--study", "m", "--trials", "3", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "objectives" in err[0]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
