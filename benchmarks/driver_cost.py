"""Driver cost per trial: what the search loop itself costs (ask, decode, storage writes, tell) when objectives
take no time, measured as the marginal wall time ``(t(large) − t(small)) / (large − small)`` of two runs of the same
job on fresh SQLite files on disk (the fixed costs — opening the study, the lease — cancel out), after one untimed
run of the job (first-use costs — lazy imports, caches — would otherwise fall in the first small run only).

The job is a per-layer space over tiny random Llamas built here (2 layers, every layer split into ``self_attn`` and
``mlp``, 2 experts, ``task_arithmetic`` or ``ties``: weight and density per model and group), driven by the real
:class:`~mergesearch.search.loop.SearchRun` with an in-process executor whose results come back at once, with
values computed from the candidate's plan (so the optimizer sees a real, varied front).

    python benchmarks/driver_cost.py                          # tpe and random, 20 and 220 trials; gp/qnehvi asks/s
    python benchmarks/driver_cost.py --optimizers tpe --small 20 --large 120 --no-model-asks

Target (issue 18): ≤ 25 ms per trial with SQLite. Also reported: the driver process's CPU time per trial (less
sensitive than wall time to other processes on a shared machine; the fsyncs of SQLite's commits are not in it),
and how fast ``gp`` and ``qnehvi`` propose (asks/s on a study of ``--ask-trials`` completed trials, one trial at
a time and a batch of 16 idle workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

RESULT = Path(__file__).parent / "results" / "driver_cost.json"
TARGET_MS = 25.0
OBJECTIVES = ("l1", "n_layers")


def build_models(root: Path, n_experts: int = 2, layers: int = 2, hidden: int = 32) -> dict[str, Path]:
    """A random tiny Llama with the demo tokenizer and ``n_experts`` noisy copies of it (cached in ``root``)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mergesearch.demo.tokenizer import build_tokenizer

    paths = {"base": root / "base", **{f"e{i}": root / f"e{i}" for i in range(n_experts)}}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tok = build_tokenizer(["<reverse>", "<swap>", "<sort>"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(paths["base"])
    tok.save_pretrained(paths["base"])
    for i in range(n_experts):
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        model.save_pretrained(paths[f"e{i}"])
        tok.save_pretrained(paths[f"e{i}"])
    return paths


def write_job(root: Path, models: dict[str, Path], optimizer: str, options: dict[str, Any] | None = None,
              tag: str | None = None) -> Path:
    """The per-layer job over ``models`` (no data files: the executor below computes the values)."""
    experts = [str(p) for k, p in models.items() if k != "base"]
    path = root / f"job_{tag or optimizer}.yaml"
    path.write_text(
        f"base_model: {models['base']}\n"
        f"models: [{', '.join(experts)}]\n"
        "space: {methods: [task_arithmetic, ties], granularity: per_layer, filters: [self_attn, mlp],\n"
        "        weight: [0, 1], density: [0.2, 1]}\n"
        "objectives:\n"
        f"  - {{type: l1_from_base, name: {OBJECTIVES[0]}}}\n"
        f"  - {{type: layers, name: {OBJECTIVES[1]}}}\n"
        f"search: {{optimizer: {optimizer}, trials: 20, seed: 0, baselines: false,\n"
        f"         options: {json.dumps(options or {})}}}\n"
        "execution: {executor: local, workers: 1}\n"
    )
    return path


def plan_numbers(obj: Any) -> Iterator[float]:
    """Every float in a JSON-like value (the plan's weights and densities)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from plan_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from plan_numbers(v)
    elif isinstance(obj, float):
        yield obj


class InstantExecutor:
    """``workers`` in-process workers whose results are ready as soon as they are submitted.

    Values: the mean of the plan's numbers and the mean squared distance of its numbers from 1 — two conflicting
    objectives of the parameters, computed in microseconds.
    """

    def __init__(self, names: tuple[str, ...], workers: int = 1) -> None:
        self.names = names
        self.workers = workers
        self._done: list[Any] = []

    @property
    def size(self) -> int:
        return self.workers

    def idle(self) -> int:
        return self.workers - len(self._done)

    def submit(self, trial: int, plan: dict[str, Any]) -> None:
        from mergesearch.execution.base import TrialResult

        v = list(plan_numbers(plan.get("plan", plan))) or [0.0]
        a = sum(v) / len(v)
        b = sum((1.0 - x) ** 2 for x in v) / len(v)
        self._done.append(TrialResult(trial, dict(zip(self.names, (a, b), strict=True)), worker="instant",
                                      timings={"queue": 0.0, "merge": 0.0, "eval": 0.0, "total": 0.0}))

    def completed(self, timeout: float | None = None) -> list[Any]:
        out, self._done = self._done, []
        return out

    def close(self) -> None:
        self._done = []


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc.append(time.perf_counter() - t)

    return wrapper


_END = object()  # a generator's end, for next(it, _END)


def _timed_steps(fn: Callable[..., Iterator[Any]], acc: list[float]) -> Callable[..., Iterator[Any]]:
    """``fn`` (a generator function) with the time of each of its steps added to ``acc`` (not the caller's)."""
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        it = fn(*args, **kwargs)
        while True:
            t = time.perf_counter()
            item = next(it, _END)
            acc.append(time.perf_counter() - t)
            if item is _END:
                return
            yield item

    return wrapper


def one_run(job: Path, db: Path | None, trials: int, workers: int = 1) -> dict[str, Any]:
    """Open a fresh study in ``db`` (None: in memory) and drive it to ``trials`` completed trials; wall time and
    its split."""
    from mergesearch.config import load_config
    from mergesearch.search.loop import SearchRun

    config = load_config(job)
    if db is not None:
        db.unlink(missing_ok=True)  # a fresh study: a file left by an earlier invocation would be resumed
    start, cpu = time.perf_counter(), time.process_time()
    run = SearchRun(config, storage=f"sqlite:///{db}" if db is not None else "memory://", study_name="d",
                    trials=trials)
    asks: list[float] = []
    tells: list[float] = []
    # this run's own optimizer instance: time its two calls without touching the class
    run.optimizer.asking = _timed_steps(run.optimizer.asking, asks)  # type: ignore[method-assign]
    run.optimizer.tell = _timed(run.optimizer.tell, tells)  # type: ignore[method-assign]
    report = run.run(InstantExecutor(OBJECTIVES, workers))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    if report.completed != trials:
        raise RuntimeError(f"run stopped at {report.completed}/{trials} trials")
    return {"trials": trials, "wall_s": wall, "cpu_s": cpu, "ask_s": sum(asks), "tell_s": sum(tells),
            "params": len(run.space.distributions)}


def marginal(job: Path, root: Path, small: int, large: int, repeats: int, workers: int = 1,
             memory: bool = False) -> dict[str, Any]:
    """``repeats`` pairs of runs, after an untimed one; the median marginal cost per trial (ms) with its ask and
    tell parts.

    ``memory``: in-memory studies instead of SQLite files (what the sampler and the loop cost without storage).
    """
    # untimed: first-use costs (lazy imports, caches) would land in the first small run and lower the marginal
    one_run(job, None if memory else root / f"{job.stem}_warmup.db", small, workers)
    pairs = []
    for r in range(repeats):
        a = one_run(job, None if memory else root / f"{job.stem}_{small}_{r}.db", small, workers)
        b = one_run(job, None if memory else root / f"{job.stem}_{large}_{r}.db", large, workers)
        per = {k: 1000 * (b[k] - a[k]) / (large - small) for k in ("wall_s", "cpu_s", "ask_s", "tell_s")}
        pairs.append({"small_s": round(a["wall_s"], 3), "large_s": round(b["wall_s"], 3),
                      "ms_per_trial": round(per["wall_s"], 2), "cpu_ms_per_trial": round(per["cpu_s"], 2),
                      "ask_ms_per_trial": round(per["ask_s"], 2), "tell_ms_per_trial": round(per["tell_s"], 2),
                      "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(json.dumps({"job": job.stem, "workers": workers, **pairs[-1]}), file=sys.stderr, flush=True)
    ms = statistics.median(p["ms_per_trial"] for p in pairs)
    cpu = statistics.median(p["cpu_ms_per_trial"] for p in pairs)
    return {"params": a["params"], "storage": "memory" if memory else "sqlite", "workers": workers, "small": small,
            "large": large, "runs": pairs,
            "ms_per_trial": round(ms, 2), "cpu_ms_per_trial": round(cpu, 2), "met": ms <= TARGET_MS}


def ask_rate(job: Path, root: Path, name: str, completed: int, batches: tuple[int, ...]) -> dict[str, Any]:
    """Asks per second of backend ``name`` on a SQLite study holding ``completed`` results (filled by ``random``
    with the instant values, then resumed with ``name``), for each batch size (idle workers) in ``batches``."""
    from mergesearch.config import load_config
    from mergesearch.search.loop import SearchRun
    from mergesearch.search.optimizers import Optimizer

    db = root / f"asks_{name}.db"
    db.unlink(missing_ok=True)
    config = load_config(job)
    fill = SearchRun(config, storage=f"sqlite:///{db}", study_name="d", trials=completed, optimizer="random")
    fill.run(InstantExecutor(OBJECTIVES, 1))
    executor = InstantExecutor(OBJECTIVES, max(batches))
    out = {"backend": name, "completed": completed, "params": len(fill.space.distributions)}
    for n in batches:
        opt = Optimizer(fill.study, fill.space.distributions, name=name, seed=0,
                        options=dict(config.search.options))
        t = time.perf_counter()
        trials = opt.ask(n)
        dt = time.perf_counter() - t
        for trial in trials:  # told at once, so the next batch sees the same data size
            executor.submit(trial.number, fill.space.candidate(trial.params))
        for res in executor.completed():
            opt.tell(res.trial, [res.values[k] for k in OBJECTIVES])
        out[f"batch_{n}"] = {"ask_s": round(dt, 3), "asks_per_s": round(n / dt, 2)}
        print(json.dumps({"backend": name, "batch": n, **out[f"batch_{n}"]}), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["tpe", "random"], metavar="NAME[:JSON]",
                        help='backends and their options, e.g. tpe random \'tpe:{"multivariate": true}\'')
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=220)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs per optimizer (median reported)")
    parser.add_argument("--memory", action="store_true",
                        help="in-memory studies (no storage cost: what the sampler and the loop cost alone)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1],
                        help="instant workers (the loop asks for this many trials at once)")
    parser.add_argument("--model-asks", nargs="*", default=["gp", "qnehvi"], metavar="BACKEND",
                        help="backends whose asks/s is measured (none: skip)")
    parser.add_argument("--no-model-asks", action="store_true")
    parser.add_argument("--ask-trials", type=int, default=40, help="completed trials before asks/s is measured")
    parser.add_argument("--ask-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dir", type=Path, help="working directory (models, SQLite files); default: a temp dir")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    root = args.dir or Path(tempfile.mkdtemp(prefix="driver_cost_"))
    root.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    models = build_models(root / "models")
    record: dict[str, Any] = {
        "target_ms_per_trial": TARGET_MS,
        "method": f"(t({args.large}) - t({args.small})) / {args.large - args.small}, "
                  f"{'in-memory study' if args.memory else 'fresh SQLite file'} per run, "
                  "per-layer space, instant in-process executor, seed 0",
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in load_start],
                    "python": platform.python_version(), "optuna": optuna.__version__},
        "driver": {},
    }
    for spec in args.optimizers:
        name, _, opts = spec.partition(":")
        options = json.loads(opts) if opts else {}
        tag = name + "".join(f"_{k}" for k in sorted(options))
        job = write_job(root, models, name, options, tag)
        for workers in args.workers:
            key = (tag if workers == 1 else f"{tag}_workers{workers}") + ("_memory" if args.memory else "")
            record["driver"][key] = marginal(job, root, args.small, args.large, args.repeats, workers, args.memory)
    if not args.no_model_asks and args.model_asks:
        job = write_job(root, models, "random")
        record["asks"] = [ask_rate(job, root, name, args.ask_trials, tuple(args.ask_batches))
                          for name in args.model_asks]
    record["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["driver"], indent=1))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
