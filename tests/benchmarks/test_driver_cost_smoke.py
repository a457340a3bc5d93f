"""benchmarks/driver_cost.py and the storage-in-the-loop part of benchmarks/ray_scaling.py on a few trials: the
figures are produced and written (no Ray: the loop runs over the in-process executor)."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.script import load_script


@pytest.fixture(scope="module")
def dc():
    return load_script("driver_cost")


def test_instant_executor_scores_the_plan(dc) -> None:
    ex = dc.InstantExecutor(("a", "b"), workers=2)
    assert ex.idle() == 2
    ex.submit(7, {"family": "static", "plan": {"models": [{"weight": 0.25}, {"weight": 0.75, "density": 1.0}]}})
    assert ex.idle() == 1
    (res,) = ex.completed()
    assert res.trial == 7 and res.ok and res.values == pytest.approx({"a": 2 / 3, "b": (0.75**2 + 0.25**2) / 3})
    assert ex.completed() == [] and ex.idle() == 2


def test_driver_cost_end_to_end(dc, tmp_path) -> None:
    out = tmp_path / "r.json"
    record = dc.main(["--optimizers", "random", "--small", "2", "--large", "4", "--model-asks", "gp",
                      "--ask-trials", "3", "--ask-batches", "1", "2", "--dir", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text()) == record
    row = record["driver"]["random"]
    assert row["params"] == 25 and row["small"] == 2 and row["large"] == 4 and len(row["runs"]) == 1
    assert isinstance(row["ms_per_trial"], float) and isinstance(row["met"], bool)
    assert {"ask_ms_per_trial", "tell_ms_per_trial", "cpu_ms_per_trial", "load_avg_1m"} <= set(row["runs"][0])
    (gp,) = record["asks"]
    assert gp["backend"] == "gp" and gp["completed"] == 3 and gp["batch_2"]["asks_per_s"] > 0
    assert len(record["machine"]["load_avg_at_start"]) == 3


def test_one_run_times_the_streaming_ask(dc, tmp_path) -> None:
    job = dc.write_job(tmp_path, dc.build_models(tmp_path / "models"), "random")
    run = dc.one_run(job, tmp_path / "o.db", 3)
    assert run["trials"] == 3 and run["ask_s"] > 0 and run["tell_s"] > 0 and run["wall_s"] > run["ask_s"]


def test_storage_loop_without_ray(tmp_path) -> None:
    from mergesearch.execution.local import LocalExecutor
    from mergesearch.execution.testing import scripted_factory

    rs = load_script("ray_scaling")
    job = rs.loop_job(tmp_path, "tpe", {"n_startup": 2})
    row = rs.storage_loop(LocalExecutor(scripted_factory()), job, tmp_path / "l.db", trials=4, duration=0.0)
    assert row["trials"] == 4 and row["failed"] == 0 and row["asked_trials"] == 4
    assert row["batch_max"] == 1 and row["idle_at_ask_max"] == 1 and 0 < row["utilisation"] <= 1
    assert 0 < row["active_s"] <= row["wall_s"] and row["utilisation"] <= row["utilisation_active"] <= 1
