"""How well the Ray executor keeps its workers busy: utilisation, dispatch overhead, trials/minute.

The driver side is the search loop's minimal form — submit to every idle worker, collect what finished — so
whatever the workers are not busy with is the executor's overhead (driver, Ray calls, result transfer).

    python benchmarks/ray_scaling.py                          # synthetic 0.5 s objective, 1 and 2 workers
    python benchmarks/ray_scaling.py --config DEMO/demo.yaml  # and the real merge worker on a job's models

Targets: utilisation ≥ 95 %, overhead ≤ 50 ms per trial.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mergesearch.execution.base import Executor, WorkerFactory
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.ray_pool import RayExecutor
from mergesearch.execution.testing import scripted_factory

Plans = Callable[[int], dict[str, Any]]


def measure(ex: Executor, plans: Plans, trials: int) -> dict[str, float]:
    """Run ``trials`` plans through ``ex`` with the minimal driver loop; return the figures."""
    for i in range(ex.size):  # warm-up: first calls pay for imports and lazy set-up in the workers
        ex.submit(-1 - i, plans(i))
    warm = 0
    while warm < ex.size:
        warm += len(ex.completed(timeout=60.0))
    results, submitted = [], 0
    start = time.perf_counter()
    while len(results) < trials:
        while ex.idle() and submitted < trials:
            ex.submit(submitted, plans(submitted))
            submitted += 1
        results.extend(ex.completed(timeout=60.0))
    wall = time.perf_counter() - start
    busy = sum(r.timings.get("merge", 0.0) + r.timings.get("eval", 0.0) for r in results)
    failed = [r.error for r in results if not r.ok]
    return {
        "workers": ex.size,
        "trials": trials,
        "failed": len(failed),
        "wall_s": round(wall, 3),
        "busy_s": round(busy, 3),
        "utilisation": round(busy / (wall * ex.size), 4),
        "overhead_ms_per_trial": round(1000 * (wall * ex.size - busy) / trials, 2),
        "mean_queue_ms": round(1000 * sum(r.timings["queue"] for r in results) / trials, 2),
        "trials_per_minute": round(60 * trials / wall, 1),
        "workers_used": len({r.worker for r in results}),
    }


def synthetic(duration: float) -> tuple[WorkerFactory, Plans]:
    """A worker that takes exactly ``duration`` s per trial (sleep: no CPU, so 2 workers fit 2 cores)."""
    return scripted_factory(), lambda i: {"x": float(i), "sleep": duration}


def real(config_path: str, seed: int = 0) -> tuple[WorkerFactory, Plans]:
    """The real merge worker on a job's models, with random plans from the job's space."""
    import numpy as np

    from mergesearch.config import load_config
    from mergesearch.execution.worker import MergeWorkerFactory
    from mergesearch.spaces.space import build_space, num_layers_of

    config = load_config(config_path)
    space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                        num_layers=num_layers_of(config.base_model), dtype=config.dtype)
    rng = np.random.default_rng(seed)
    points = {}

    def plans(i: int) -> dict[str, Any]:
        if i not in points:  # the same plan for the same index, whatever the executor
            points[i] = space.decode(space.from_unit(rng.random(len(space.distributions)))).to_dict()
        return points[i]

    return MergeWorkerFactory(config), plans


def run(factory: WorkerFactory, plans: Plans, workers: list[int], trials_per_worker: int) -> list[dict]:
    """The in-process baseline, then the Ray pool at each size."""
    runs = [{"executor": "local", **measure(LocalExecutor(factory), plans, trials_per_worker)}]
    for n in workers:
        started = time.perf_counter()
        with RayExecutor(factory, workers=n, env={"OMP_NUM_THREADS": "1"}) as ex:
            startup = time.perf_counter() - started
            runs.append({"executor": "ray", "startup_s": round(startup, 2),
                         **measure(ex, plans, n * trials_per_worker)})
        print(json.dumps(runs[-1]))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=0.5, help="synthetic trial duration, s")
    parser.add_argument("--trials-per-worker", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", help="job YAML (e.g. a demo build's demo.yaml): also benchmark the real worker")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_scaling.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray

    cases = {f"synthetic sleep {args.duration} s": lambda: synthetic(args.duration)}
    if args.config:
        cases[f"real merge worker, {args.config}"] = lambda: real(args.config)
    ray_start = time.perf_counter()
    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    ray_start = time.perf_counter() - ray_start
    try:
        benchmarks = [{"objective": name, "runs": run(*make(), args.workers, args.trials_per_worker)}
                      for name, make in cases.items()]
    finally:
        ray.shutdown()
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "ray": ray.__version__},
        "ray_init_s": round(ray_start, 2),
        "targets": {"utilisation": 0.95, "overhead_ms_per_trial": 50},
        "benchmarks": benchmarks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
