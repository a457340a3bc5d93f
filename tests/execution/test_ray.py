"""RayExecutor on one local Ray session shared by the module (ray.init costs ~6 s)."""

from __future__ import annotations

import logging
import time
from collections import Counter

import pytest

from mergesearch.errors import ExecutionError
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.ray_pool import RayExecutor
from mergesearch.execution.testing import scripted_factory

from .helpers import drain, free_port

ray = pytest.importorskip("ray")

PLANS = [{"x": 0.5 * i, "sleep": 0.02} for i in range(8)]
PLANS[2] = {"x": 1.0, "fail": "plan rejected: density 1.7 > 1"}
PLANS[5] = {"x": 3.0, "nan": True}


@pytest.fixture(scope="module")
def session():
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(session):
    ex = RayExecutor(scripted_factory(), workers=2, max_retries=2)
    yield ex
    ex.close()
    assert ray.is_initialized(), "an executor must not shut down a Ray session it did not start"


def test_results_identical_to_local_executor(pool) -> None:
    local = {r.trial: r for r in drain(LocalExecutor(scripted_factory()), PLANS)}
    remote = {r.trial: r for r in drain(pool, PLANS)}
    assert sorted(remote) == list(range(len(PLANS)))
    for trial, r in remote.items():
        assert (r.values, r.error) == (local[trial].values, local[trial].error)
        assert r.worker in pool.nodes() and r.attempts == 1
    assert remote[2].error == "plan rejected: density 1.7 > 1"
    assert remote[5].error == "objective 'score' returned nan"
    assert remote[7].ok and set(remote[7].timings) == {"queue", "merge", "eval", "total"}
    assert pool.idle() == 2


def test_async_dispatch_no_generation_barrier(pool) -> None:
    # One long trial, then short ones submitted whenever a worker is idle: the other worker must keep going.
    results, nxt = [], 1
    pool.submit(0, {"x": 0.0, "sleep": 1.5})
    while len(results) < 8:
        while pool.idle() and nxt < 8:
            pool.submit(nxt, {"x": float(nxt), "sleep": 0.1})
            nxt += 1
        results.extend(pool.completed(timeout=10.0))
    assert [r.trial for r in results] == [1, 2, 3, 4, 5, 6, 7, 0], "completion order, the long trial last"
    per_worker = Counter(r.worker for r in results)
    assert per_worker[results[-1].worker] == 1 and max(per_worker.values()) == 7


def test_killed_worker_trial_completes_exactly_once(pool) -> None:
    plans = [{"x": float(i), "sleep": 0.6} for i in range(6)]
    before = dict(pool.nodes())
    results = drain(pool, plans, kill_first=True)
    assert sorted(r.trial for r in results) == list(range(6)), "every trial exactly once"
    assert all(r.ok for r in results)
    assert {r.trial: r.values["score"] for r in results} == {i: 2.0 * i for i in range(6)}
    again = next(r for r in results if r.trial == 0)
    assert again.attempts == 2 and sum(r.attempts for r in results) == 7
    # The killed actor is restarted (new pid) and serves again.
    deadline = time.monotonic() + 30
    while pool.idle() < 2 and time.monotonic() < deadline:
        pool.completed(timeout=0.5)
    assert pool.idle() == 2 and len(set(pool.nodes()) - set(before)) == 1


def test_prefetched_trial_goes_to_the_worker_that_frees_before_the_driver_records(session) -> None:
    with RayExecutor(scripted_factory(), workers=1, prefetch=1, num_cpus=0.5) as ex:
        assert ex.idle() == 2, "one idle worker and one place in the queue"
        ex.submit(0, {"x": 0.0, "sleep": 0.4})
        ex.submit(1, {"x": 1.0, "sleep": 0.4})
        assert ex.idle() == 0 and list(ex.running()) == [0]
        first: list = []
        while not first:
            first = ex.completed(timeout=10.0)
        assert [r.trial for r in first] == [0]
        # handed over inside completed(): running while the caller has not recorded trial 0 yet
        assert ex.running() == {1: first[0].worker}
        assert ex.idle() == 1, "the queue has room again"
        later: list = []
        while not later:
            later = ex.completed(timeout=10.0)
        (second,) = later
        assert second.trial == 1 and second.ok and second.values == {"score": 2.0, "cost": 1.0}
        # it waited in the queue while trial 0 ran, not while the driver worked
        assert second.timings["queue"] < first[0].timings["total"] + 0.2


def test_prefetch_runs_every_trial_exactly_once_with_a_killed_worker(session) -> None:
    with RayExecutor(scripted_factory(), workers=2, prefetch=2, max_retries=2, num_cpus=0.5) as ex:
        results = drain(ex, [{"x": float(i), "sleep": 0.3} for i in range(8)], kill_first=True)
    assert sorted(r.trial for r in results) == list(range(8)) and all(r.ok for r in results)
    assert {r.trial: r.values["score"] for r in results} == {i: 2.0 * i for i in range(8)}
    assert next(r for r in results if r.trial == 0).attempts == 2


def test_search_loop_with_prefetch_stores_exactly_the_target(session, tmp_path) -> None:
    """The search loop over a prefetching pool: more trials in flight than workers, none beyond the target."""
    import optuna

    from tests.benchmarks.script import load_script

    rs = load_script("ray_scaling")
    with RayExecutor(scripted_factory(), workers=2, prefetch=3, num_cpus=0.5) as ex:
        row = rs.storage_loop(ex, rs.loop_job(tmp_path, "random", {}), tmp_path / "p.db", trials=10, duration=0.05,
                              streaming=True)
    assert row["trials"] == 10 and row["failed"] == 0 and row["asked_trials"] == 10
    assert row["idle_at_ask_max"] == 5, "2 idle workers + 3 places in the queue at the first ask"
    study = optuna.load_study(study_name="loop", storage=f"sqlite:///{tmp_path / 'p.db'}")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 10


def test_retries_exhausted_fail_the_trial_and_worker_keeps_serving(session) -> None:
    with RayExecutor(scripted_factory(), workers=1, max_retries=0, num_cpus=0.5) as ex:
        (died,) = drain(ex, [{"x": 1.0, "sleep": 5.0}], kill_first=True)
        assert not died.ok and died.attempts == 1
        assert died.error.startswith(f"worker {died.worker} died running the trial (attempt 1 of 1): ")
        assert "\n" not in died.error
        (after,) = drain(ex, [{"x": 2.0}])
        assert after.ok and after.values == {"score": 4.0, "cost": 4.0} and after.worker != died.worker


def test_bad_inputs_are_one_line_execution_errors(session) -> None:
    started = time.monotonic()
    with pytest.raises(ExecutionError, match=r"^cannot reach the Ray cluster at '127\.0\.0\.1:\d+': "):
        RayExecutor(scripted_factory(), address=f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 10, "an unreachable address must fail fast"
    with pytest.raises(ExecutionError, match=r"^Ray address must be 'auto', 'HOST:PORT'"):
        RayExecutor(scripted_factory(), address="nowhere")
    with pytest.raises(ExecutionError, match=r"^num_gpus=1 per worker, but the largest Ray node has 0$"):
        RayExecutor(scripted_factory(), num_gpus=1)
    with pytest.raises(ExecutionError, match=r"^5 workers × num_cpus=2 need 10 CPUs, but the Ray cluster has 6$"):
        RayExecutor(scripted_factory(), workers=5, num_cpus=2)


def test_failing_factory_is_one_line_error_and_releases_resources(pool) -> None:
    cpus = ray.cluster_resources()["CPU"] - pool.size  # all but the shared pool's actors, once released
    with pytest.raises(ExecutionError) as info:
        RayExecutor(scripted_factory("/nonexistent/model"), workers=2, num_cpus=1)
    assert str(info.value).endswith("could not start: model directory not found: /nonexistent/model")
    assert str(info.value).startswith("worker ") and "\n" not in str(info.value)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) != cpus and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources()["CPU"] == cpus, "actors of a failed start must be killed"
