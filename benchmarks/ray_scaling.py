"""How well the Ray executor keeps its workers busy: utilisation, dispatch overhead, trials/minute.

Two drivers:

- the executor alone: the search loop's minimal form — submit to every idle worker, collect what finished — so
  whatever the workers are not busy with is the executor's overhead (Ray calls, result transfer);
- the storage in the loop (``--loop-optimizers``): the real :class:`~mergesearch.search.loop.SearchRun` on a SQLite
  study — ask the optimizer for every idle worker at once, decode, submit, tell with the trial's record — over
  ``--loop-workers`` simulated workers (fractional CPUs, objectives that sleep ``--loop-duration`` s) and a per-layer
  space (the job of ``benchmarks/driver_cost.py``). Reported per optimizer: utilisation, asks/s (trials proposed per
  second of ask time), the batch sizes asked and the idle workers waiting at each ask (the "queue": a backend
  whose ask cost grew with the batch would see it grow).

    python benchmarks/ray_scaling.py                          # synthetic 0.5 s objective, 1 and 2 workers
    python benchmarks/ray_scaling.py --config DEMO/demo.yaml  # and the real merge worker on a job's models
    python benchmarks/ray_scaling.py --loop-optimizers tpe random gp@48 qnehvi@48   # + 16 workers, storage in the loop
    python benchmarks/ray_scaling.py --workers --loop-optimizers random --loop-streaming on --loop-prefetch 0 4 16

Targets: utilisation ≥ 95 %, overhead ≤ 50 ms per trial (executor alone); utilisation ≥ 95 % with ``tpe`` and the
storage in the loop (issue 18). A loop run reports two: ``utilisation`` over the whole ``SearchRun.run`` (its set-up
and its closing report, which reads every trial, included) and ``utilisation_active`` from the first submission to
the last result (the executor-alone runs' definition).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mergesearch.execution.base import Executor, TrialResult, WorkerFactory
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.ray_pool import RayExecutor
from mergesearch.execution.testing import scripted_factory

sys.path.insert(0, str(Path(__file__).parent))  # driver_cost.py: the job and models of the storage-in-the-loop run

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


class SleepingPlans:
    """The search loop's executor for simulated workers: every candidate the loop submits becomes a
    :class:`~mergesearch.execution.testing.ScriptedWorker` plan that sleeps ``duration`` s and scores ``x`` = the
    mean of the candidate's numbers (``score = 2x``, ``cost = x²``: the job's two objectives).

    Also records, at each ask, how many workers were idle (:attr:`idle_at_ask`).
    """

    def __init__(self, inner: Executor, duration: float) -> None:
        self.inner = inner
        self.duration = duration
        self.idle_at_ask: list[int] = []
        self.first_submit: float | None = None  # perf_counter of the first submission

    @property
    def size(self) -> int:
        return self.inner.size

    def idle(self) -> int:
        return self.inner.idle()

    def submit(self, trial: int, plan: dict[str, Any]) -> None:
        from driver_cost import plan_numbers

        v = list(plan_numbers(plan.get("plan", plan))) or [0.0]
        if self.first_submit is None:
            self.first_submit = time.perf_counter()
        self.inner.submit(trial, {"x": sum(v) / len(v), "sleep": self.duration})

    def completed(self, timeout: float | None = None) -> list[TrialResult]:
        return self.inner.completed(timeout)

    def close(self) -> None:
        self.inner.close()


def loop_job(root: Path, optimizer: str, options: dict[str, Any]) -> Path:
    """The per-layer job of ``driver_cost.py`` with the scripted worker's objectives (score ↑, cost ↓)."""
    from driver_cost import build_models

    models = build_models(root / "models")
    experts = [str(p) for k, p in models.items() if k != "base"]
    path = root / f"loop_{optimizer}.yaml"
    path.write_text(
        f"base_model: {models['base']}\n"
        f"models: [{', '.join(experts)}]\n"
        "space: {methods: [task_arithmetic, ties], granularity: per_layer, filters: [self_attn, mlp],\n"
        "        weight: [0, 1], density: [0.2, 1]}\n"
        "objectives:\n"
        "  - {type: layers, name: score, direction: maximize}\n"
        "  - {type: l1_from_base, name: cost}\n"
        f"search: {{optimizer: {optimizer}, trials: 20, seed: 0, baselines: false, options: {json.dumps(options)}}}\n"
        "execution: {executor: ray, workers: 1}\n"
    )
    return path


def storage_loop(ex: Executor, job: Path, db: Path, trials: int, duration: float,
                 streaming: bool = False) -> dict[str, Any]:
    """Drive a fresh SQLite study to ``trials`` completed trials with the real search loop over ``ex``.

    ``streaming``: the loop gets each asked trial as soon as it is stored and submits it while the next is
    sampled (what ``SearchRun.run`` does); without it, the whole batch is asked before the first is submitted.
    """
    from mergesearch.config import load_config
    from mergesearch.search.loop import SearchRun

    db.unlink(missing_ok=True)  # a fresh study: a file left by an earlier invocation would be resumed
    run = SearchRun(load_config(job), storage=f"sqlite:///{db}", study_name="loop", trials=trials)
    plans = SleepingPlans(ex, duration)
    asks: list[tuple[int, float]] = []
    tells: list[float] = []
    optimizer = run.optimizer
    asking, tell = optimizer.asking, optimizer.tell

    def streamed(n: int) -> Iterator[Any]:
        spent, it = 0.0, asking(n)
        while True:
            t = time.perf_counter()
            trial = next(it, None)
            spent += time.perf_counter() - t
            if trial is None:
                break
            yield trial
        asks.append((n, spent))

    def timed_asking(n: int) -> Any:  # this run's optimizer instance only
        plans.idle_at_ask.append(ex.idle())
        if streaming:
            return streamed(n)
        t = time.perf_counter()
        out = list(asking(n))  # the whole batch before the first trial is submitted
        asks.append((n, time.perf_counter() - t))
        return iter(out)

    def timed_tell(*args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        tell(*args, **kwargs)
        tells.append(time.perf_counter() - t)

    optimizer.asking = timed_asking  # type: ignore[method-assign]
    optimizer.tell = timed_tell  # type: ignore[method-assign]
    results: list[TrialResult] = []
    last_result = [0.0]

    def on_result(res: TrialResult) -> None:
        results.append(res)
        last_result[0] = time.perf_counter()

    start = time.perf_counter()
    run.run(plans, on_result=on_result)
    wall = time.perf_counter() - start
    active = last_result[0] - (plans.first_submit or start)  # first submission to the last result
    busy = sum(r.timings.get("merge", 0.0) + r.timings.get("eval", 0.0) for r in results)
    asked = sum(n for n, _ in asks)
    ask_s = sum(t for _, t in asks)
    batches = [n for n, _ in asks]
    return {
        "workers": ex.size,
        "streaming_asks": streaming,
        "trials": len(results),
        "failed": sum(not r.ok for r in results),
        "wall_s": round(wall, 2),
        "utilisation": round(busy / (wall * ex.size), 4),
        # without the run's set-up (opening the study, the first read) and its report (reading every trial)
        "active_s": round(active, 2),
        "utilisation_active": round(busy / (active * ex.size), 4),
        "asks": len(asks),
        "asked_trials": asked,
        "ask_s": round(ask_s, 2),
        "asks_per_s": round(asked / ask_s, 2) if ask_s else None,
        "tell_ms_per_trial": round(1000 * sum(tells) / max(1, len(tells)), 1),
        "batch_mean": round(asked / max(1, len(asks)), 2),
        "batch_max": max(batches, default=0),
        "idle_at_ask_mean": round(sum(plans.idle_at_ask) / max(1, len(plans.idle_at_ask)), 2),
        "idle_at_ask_max": max(plans.idle_at_ask, default=0),
        "idle_at_ask_last_quarter_mean": _tail_mean(plans.idle_at_ask),
        "trials_per_minute": round(60 * len(results) / wall, 1),
    }


def _tail_mean(xs: list[int]) -> float | None:
    """Mean of the last quarter (a growing queue shows as a tail above the start)."""
    tail = xs[len(xs) - max(1, len(xs) // 4):]
    return round(sum(tail) / len(tail), 2) if tail else None


def loop_runs(optimizers: list[str], workers: int, trials: int, duration: float, root: Path,
              streaming: tuple[bool, ...] = (False,), prefetch: tuple[int, ...] = (0,)) -> list[dict]:
    """The storage-in-the-loop run of each optimizer (each ``streaming`` mode) over a pool of ``workers``
    fractional-CPU actors, one pool per ``prefetch`` (trials queued in the driver ahead of the workers)."""
    cpus = os.cpu_count() or 1
    out = []
    for ahead in prefetch:
        with RayExecutor(scripted_factory(), workers=workers, num_cpus=min(1.0, cpus / workers), prefetch=ahead,
                         env={"OMP_NUM_THREADS": "1"}) as ex:
            for spec in optimizers:
                spec, _, count = spec.partition("@")
                name, _, opts = spec.partition(":")
                options = json.loads(opts) if opts else {}
                for stream in streaming:
                    row = {"optimizer": name, "options": options, "prefetch": ahead,
                           **storage_loop(ex, loop_job(root, name, options), root / f"loop_{name}_{len(out)}.db",
                                          int(count) if count else trials, duration, stream),
                           "load_avg_1m": round(os.getloadavg()[0], 2)}
                    print(json.dumps(row), flush=True)
                    out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=0.5, help="synthetic trial duration, s")
    parser.add_argument("--trials-per-worker", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="pool sizes for the executor-alone runs (none: skip them)")
    parser.add_argument("--config", help="job YAML (e.g. a demo build's demo.yaml): also benchmark the real worker")
    parser.add_argument("--loop-optimizers", nargs="*", default=[], metavar="NAME[:JSON][@TRIALS]",
                        help='storage-in-the-loop runs, e.g. tpe \'tpe:{"multivariate": true}\' gp@48 qnehvi@48')
    parser.add_argument("--loop-workers", type=int, default=16)
    parser.add_argument("--loop-trials", type=int, default=128, help="completed trials per storage-in-the-loop run")
    parser.add_argument("--loop-duration", type=float, default=1.0, help="simulated objective time, s")
    parser.add_argument("--loop-streaming", choices=["off", "on", "both"], default="both",
                        help="the loop submits each asked trial at once (Optimizer.asking) instead of after the batch")
    parser.add_argument("--loop-prefetch", type=int, nargs="+", default=[0],
                        help="trials queued in the driver ahead of the workers (execution.prefetch), one pool each")
    parser.add_argument("--dir", type=Path, help="models and SQLite files of the loop runs (default: a temp dir)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_scaling.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    cases = {f"synthetic sleep {args.duration} s": lambda: synthetic(args.duration)}
    if args.config:
        cases[f"real merge worker, {args.config}"] = lambda: real(args.config)
    load_start = os.getloadavg()
    ray_start = time.perf_counter()
    ray.init(address="local", num_cpus=max([*args.workers, os.cpu_count() or 1]), include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    ray_start = time.perf_counter() - ray_start
    try:
        benchmarks = [{"objective": name, "runs": run(*make(), args.workers, args.trials_per_worker)}
                      for name, make in cases.items()] if args.workers else []
        if args.loop_optimizers:
            import tempfile

            root = args.dir or Path(tempfile.mkdtemp(prefix="ray_loop_"))
            root.mkdir(parents=True, exist_ok=True)
            benchmarks.append({"objective": f"storage in the loop: SQLite, per-layer space, {args.loop_workers} "
                                            f"simulated workers sleeping {args.loop_duration} s",
                               "runs": loop_runs(args.loop_optimizers, args.loop_workers, args.loop_trials,
                                                 args.loop_duration, root,
                                                 {"off": (False,), "on": (True,), "both": (False, True)}[
                                                     args.loop_streaming], tuple(args.loop_prefetch))})
    finally:
        ray.shutdown()
    report = {
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in load_start],
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "ray": ray.__version__},
        "ray_init_s": round(ray_start, 2),
        "targets": {"utilisation": 0.95, "overhead_ms_per_trial": 50},
        "benchmarks": benchmarks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
