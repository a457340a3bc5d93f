"""LocalExecutor: the in-process reference every other executor must agree with."""

from __future__ import annotations

import pytest

from mergesearch.errors import ExecutionError
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.testing import scripted_factory


def test_runs_queued_trials_in_order_with_closed_form_values() -> None:
    ex = LocalExecutor(scripted_factory())
    assert ex.size == 1 and ex.idle() == 1
    ex.submit(0, {"x": 1.5})
    assert ex.idle() == 0
    ex.submit(1, {"x": -2.0, "sleep": 0.05})
    results = ex.completed(timeout=1.0)
    assert [r.trial for r in results] == [0, 1]
    assert results[0].values == {"score": 3.0, "cost": 2.25}
    assert results[1].values == {"score": -4.0, "cost": 4.0}
    assert results[1].timings["merge"] >= 0.05
    assert set(results[1].timings) == {"queue", "merge", "eval", "total"}
    assert all(r.ok and r.worker == "local" and r.attempts == 1 for r in results)
    assert ex.completed(timeout=0.0) == [] and ex.idle() == 1


def test_bad_candidates_fail_with_one_line_reason_and_worker_keeps_serving() -> None:
    ex = LocalExecutor(scripted_factory())
    ex.submit(0, {"x": 1.0, "fail": "plan rejected: weight out of range"})
    ex.submit(1, {"x": 1.0, "nan": True})
    ex.submit(2, {"sleep": "not a number"})
    ex.submit(3, {"x": 2.0})
    failed_trial, nan_trial, crashed, good = ex.completed()
    assert failed_trial.error == "plan rejected: weight out of range" and failed_trial.values is None
    assert nan_trial.error == "objective 'score' returned nan" and not nan_trial.ok
    assert crashed.error.startswith("ValueError: could not convert string to float")
    assert "\n" not in crashed.error
    assert good.ok and good.values == {"score": 4.0, "cost": 4.0}


def test_failing_factory_is_one_line_execution_error() -> None:
    with pytest.raises(ExecutionError, match=r"^worker could not start: model directory not found: "
                       r"/nonexistent/model$"):
        LocalExecutor(scripted_factory("/nonexistent/model"))
