"""Task vectors shared through Ray's object store: same results, one read-only copy, actors survive restarts."""

from __future__ import annotations

import time

import pytest

from mergesearch.config import load_config
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.worker import MergeWorkerFactory

from ..conftest import write_job
from .helpers import drain, kill_worker

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # its own ray.init and two workers loading models (~30 s here)


def plans(models) -> list[dict]:
    out = []
    for i, method in enumerate(["ties", "dare_ties", "task_arithmetic"]):
        density = {} if method == "task_arithmetic" else {"density": 0.3 + 0.2 * i}
        out.append({"merge_method": method, "base_model": str(models["base"]), "dtype": "float32",
                    "random_seed": 1, "models": [
                        {"model": str(models["a"]), "parameters": {"weight": 0.7, **density}},
                        {"model": str(models["b"]), "parameters": {"weight": 0.4, **density}}]})
    return out


def _probe(factory: MergeWorkerFactory) -> tuple[int, int]:
    """In a worker process: (task vectors backed by the object store's read-only buffers, task vectors)."""
    worker = factory()
    arrays = {(m, n): a for m, ref in factory.shared for n, a in ray.get(ref).items()}
    deltas = worker.merger._deltas
    shared = sum(deltas[k].data_ptr() == a.ctypes.data and not a.flags.writeable for k, a in arrays.items())
    return shared, len(deltas)


def test_shared_task_vectors_on_ray(tiny_models, tmp_path) -> None:
    from mergesearch.search.loop import make_executor

    cheap = ("  - {type: loglik, name: sort_ll, data: data/sort_search.jsonl, test: data/sort_test.jsonl}\n"
             "  - {type: l1_from_base, name: l1}\n")
    base = load_config(write_job(tmp_path, tiny_models, objectives=cheap))
    shared = base.model_copy(update={"execution": base.execution.model_copy(update={
        "executor": "ray", "workers": 2, "share_task_vectors": True})})
    jobs = plans(tiny_models)
    local = sorted(drain(LocalExecutor(MergeWorkerFactory(base)), jobs), key=lambda r: r.trial)
    assert all(r.error is None for r in local), [r.error for r in local]
    with make_executor(shared) as ex:
        factory = ex._factory
        assert len(factory.shared) == 2, "one object per source model"
        first = sorted(drain(ex, jobs), key=lambda r: r.trial)
        n_shared, n_deltas = ray.get(ray.remote(num_cpus=0)(_probe).remote(factory))  # CPUs: the actors
        assert n_shared == n_deltas == 2 * len(ray.get(factory.shared[0][1]))
        # Killed workers restart and resolve the refs again (nothing big in their constructor args).
        before = set(ex.nodes())
        for worker in before:
            kill_worker(worker)
        time.sleep(0.5)
        again = sorted(drain(ex, jobs), key=lambda r: r.trial)
        assert {r.worker for r in again}.isdisjoint(before), "trials ran on the restarted processes"
    for a, b, c in zip(local, first, again, strict=True):
        assert a.values == b.values == c.values, a.trial  # bit-identical merges give identical scores
