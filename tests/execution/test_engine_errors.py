"""A trial fails for its candidate; an engine error (a bug) stops the run with one line and re-queues the trial.
The local worker's thread count applies to its trials only, not to the driver process it shares."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

from mergesearch.cli import main


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


def test_engine_error_stops_the_run_and_requeues_the_trial(tiny_job: Path, tmp_path: Path, capsys, monkeypatch):
    from mergesearch.execution import worker

    def broken(self, spec):
        raise TypeError("boom: an engine bug")

    url = f"sqlite:///{tmp_path / 'e.db'}"
    args = ["run", str(tiny_job), "--storage", url, "--study", "e", "--no-progress"]
    assert _run([*args, "--trials", "1"], capsys)[0] == 0
    monkeypatch.setattr(worker.MergeWorker, "evaluate", broken)
    code, err = _run([*args, "--trials", "3"], capsys)
    errors = [line for line in err if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and "engine error" in errors[0] and "TypeError: boom" in errors[0]
    trials = optuna.load_study(study_name="e", storage=url).trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 1  # the stored trial untouched
    # not stored as a bad candidate: the interrupted trial waits to be evaluated again
    assert any(t.state == optuna.trial.TrialState.WAITING for t in trials)
    assert not any(str(t.user_attrs.get("fail_reason", "")).startswith("TypeError") for t in trials)
    monkeypatch.undo()
    assert _run([*args, "--trials", "3"], capsys)[0] == 0  # the fixed engine resumes to the exact count
    trials = optuna.load_study(study_name="e", storage=url).trials
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3


def test_candidate_errors_still_fail_only_their_trial():
    from mergesearch.errors import NonFiniteError
    from mergesearch.execution.local import candidate_failure

    assert candidate_failure(NonFiniteError("x")) and candidate_failure(MemoryError())
    assert not candidate_failure(TypeError("bug")) and not candidate_failure(KeyError("bug"))


def test_local_worker_threads_do_not_leak_into_the_driver(tiny_job: Path, tmp_path: Path, monkeypatch):
    from mergesearch.config import load_config
    from mergesearch.execution.local import LocalExecutor
    from mergesearch.execution.worker import MergeWorkerFactory

    before = torch.get_num_threads()
    config = load_config(tiny_job)
    config = config.model_copy(update={"execution": config.execution.model_copy(update={"threads": 1})})
    pool = LocalExecutor(MergeWorkerFactory(config))
    torch.set_num_threads(2)
    seen = []
    original = pool._worker.merger.apply

    def spy(plan):
        seen.append(torch.get_num_threads())
        return original(plan)

    monkeypatch.setattr(pool._worker.merger, "apply", spy)
    from mergesearch.merging.plan import MergePlan

    plan = MergePlan.model_validate({"merge_method": "task_arithmetic", "base_model": config.base_model,
                                     "models": [{"model": m, "parameters": {"weight": 0.5}} for m in config.models]})
    pool.submit(0, plan.to_dict())
    (res,) = pool.completed(timeout=30)
    assert res.ok, res.error
    assert seen == [1] and torch.get_num_threads() == 2  # the trial ran on 1 thread; the driver keeps its 2
    torch.set_num_threads(before)
