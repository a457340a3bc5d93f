"""HM3 on the demo's layer space: hypervolume against nsga2, gp and random, and `suggest` for unseen preferences.

Space: the demo job's (task arithmetic, one weight per expert in [0, 1]) plus layer choices (``space.layers``):
slots = 2 × the base's layers (the network laid out twice, as in Sakana's DFS), each filled by ``merged``, ``base``,
one expert's layer, or ``skip``. Objectives: the demo's, reverse / swap / sort exact match (maximised) and the L1
distance from the base (minimised). hm3 runs with its default options (``--hm3-options`` overrides them).

Reference point, fixed before any search: accuracy 0 on every task and l1 = 1.1 × the largest l1 of the space's
full-depth plans (every slot kept with one choice, every weight 1; scored once, first, by the resident worker), as
search_quality takes 1.1 × its space's largest-weight plan. (1.1 × the costliest expert's l1, the first choice,
left only paths that keep one layer per depth, in depth order, cheaply, inside the box: 5 of the 16 ways to keep
four of eight slots; a dev run of hm3 alone, seed 100, found none in 120 evaluations, and every optimizer would
have scored about 0.) Hypervolumes are normalised by the volume of the box [0, 1]^3 × [0, l1_ref] and reported at
60 and 120 evaluations (``--checkpoints``), mean ± sd over ``--seeds`` seeds (0, 1, ...; ``--first-seed``); every
study lives in memory and one resident worker (models loaded once) scores every trial.

Preferences: ``--preferences`` (10) weight vectors over the four objectives, drawn once from Dirichlet(1) with
their own seed (:data:`PREFERENCE_SEED`), not from the training's draws. For every hm3 run, each one is given to
``suggest`` (the run's final networks: what ``mergesearch suggest`` rebuilds from the stored trials), the proposal is
scored, and ranked by that preference's ASF (:func:`mergesearch.search.preference.pick`, as the command reports it)
among the run's final front with the proposal added. "Top 10 %" means rank <= max(1, ceil(0.1 × front size)).

Targets (issue 19): hm3's mean HV at the last checkpoint >= every other optimizer's; the suggestion in the top 10 %
for >= 8 of 10 preferences (checked per seed; met when every seed meets it).

    OMP_NUM_THREADS=1 python benchmarks/hm3.py [--seeds 3] [--budget 120] [--optimizers hm3,nsga2,random,gp]
        [--seeds-for gp=1] [--budget-for gp=60] [--time-for gp=SECONDS] [--preferences 10] [--limit 32]
        [--hm3-options '{"steps": 60}'] [--first-seed 0] [--initial path:merged,path:base,...]
        [--name hm3.json] [--merge OTHER.json ...]

``--initial`` gives every run the same ``search.initial`` points (preset names; by default none: each optimizer
starts as it would for a user). Files merged with ``--merge`` must agree on it.

``--time-for`` stops each run of an optimizer cleanly after that wall time (recorded: ``stopped_by_time``; its HV at
a checkpoint it did not reach is missing, and its last HV is reported as a lower bound there). ``--merge`` folds in
the runs (and suggestions) of other result files of the same configuration, e.g. seeds run as separate processes;
``--optimizers ''`` with ``--merge`` only merges.

Recorded runs:

- ``results/hm3.json`` (hm3 without a value model, its first version): ``--limit 32 --seeds-for gp=1
  --budget-for gp=60``.
- ``results/hm3_ensemble.json`` (hm3 with the value ensemble of bootstrapped random-feature networks, the default
  until the Gaussian process replaced it): every optimizer on seeds 0, 1, 2 with 120 evaluations and ``--limit 32``,
  each hm3 / gp seed in its own process (``--optimizers hm3 --seeds 1 --first-seed S``; gp with ``--preferences
  0``), nsga2 and random in one, merged with ``--optimizers '' --merge ...``.
- ``results/hm3_value_gp.json`` (hm3 with the Gaussian-process value model, the default now): the same runs, the
  same way, gp each seed with ``--time-for gp=1900``; ``results/hm3_value_gp.seeds3-5.json`` the same on seeds 3-5
  (``--first-seed 3``), run afterwards as a supplement.
- ``results/hm3_dedup.dec03.json``: hm3 that never proposes a plan again with another recipe, each seed in its own
  process (``--optimizers hm3 --seeds 1 --first-seed S``), merged with the gp / nsga2 / random runs of
  ``hm3_value_gp.dec02c.json`` (the same demo build); ``development_iterations`` holds the variants tried first
  on seeds 10-14.
- ``results/hm3_sigma.dec03.json``: the same with hm3's ``sigma`` 0.3 (its default since), the same commands;
  ``results/hm3_sigma.seeds10-14.json`` hm3 and gp side by side on hm3's tuning seeds 10-14 (``--preferences 0``;
  a supplement that favours hm3, whose settings were chosen on those seeds) and ``results/hm3_sigma.seeds3-5.json``
  the same on seeds 3-5, held out (no setting was chosen on them).
- ``results/hm3_start.dec03.json``: hm3 whose start-up design begins with the space's source paths (its default
  since), the same commands and merge; ``hm3_start.seeds10-14.json`` and ``hm3_start.seeds3-5.json`` the same
  side by side with the gp runs of the ``hm3_sigma`` files; ``hm3_start.gp_initial.json`` gp given those start
  points as ``search.initial`` (``--optimizers gp --initial path:merged,path:base,path:reverse,path:swap,path:sort``),
  seeds 0-5, to measure how much of hm3's gain the start points alone give another optimizer (``comparison``:
  per seed against hm3).

The demo's experts are trained when the demo is built, on the machine that builds it: two builds give the same
plans different scores, so hypervolumes compare within one file (one build, side by side), not across files.

Writes ``benchmarks/results/hm3.json`` (``--out DIR``, ``--name``; seeds, configuration, wall time) and prints the
table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")

RESULTS = Path(__file__).parent / "results"
DEMO_DIR = Path("/tmp/h2demo/full")
OPTIMIZERS = ["hm3", "nsga2", "random", "gp"]  # gp last: its asks cost seconds each
CHECKPOINTS = [60, 120]
PREFERENCE_SEED = 20240919  # the preferences' own stream (the issue's number and arXiv month): never a training draw
TOP = 0.1  # "top 10 % of the front"
L1_MARGIN = 1.1  # l1 reference = this × the largest l1 of the full-depth plans


def layer_space(config: Any) -> Any:
    """The demo's space with layer choices: slots = 2 × layers; merged / base / each expert / skip."""
    from mergesearch.config import LayerSpace
    from mergesearch.spaces import num_layers_of

    names = [Path(m).name for m in config.models]
    layers = LayerSpace(slots=2 * num_layers_of(config.base_model), choices=["merged", "base", *names, "skip"])
    return config.space.model_copy(update={"layers": layers})


def demo_config(demo_dir: Path, limit: int | None = None) -> Any:
    """The demo job under ``demo_dir`` (built first if absent) with the layer space, a local executor, no reference
    rows (the reference point is given) and, with ``limit``, that many examples per task objective."""
    from mergesearch.config import load_config
    from mergesearch.demo.build import build_demo

    if not (demo_dir / "demo.yaml").is_file():
        build_demo(demo_dir, progress=lambda m: print(m, file=sys.stderr))
    config = load_config(demo_dir / "demo.yaml")
    objectives = config.objectives
    if limit is not None:
        objectives = [o.model_copy(update={"limit": limit}) if o.data is not None else o for o in objectives]
    return config.model_copy(update={
        "space": layer_space(config), "objectives": objectives,
        "execution": config.execution.model_copy(update={"executor": "local"}),
        "search": config.search.model_copy(update={"initial": [], "refine": 0, "baselines": False})})


def full_depth_plans(config: Any) -> dict[str, dict[str, Any]]:
    """The space's params that keep every slot with one choice (each non-skip choice), every weight at its top:
    the network laid out twice, the costliest plans of the space."""
    from mergesearch.spaces import build_space, num_layers_of

    space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                        num_layers=num_layers_of(config.base_model), dtype=config.dtype, seed=0)
    slots = [n for n in space.distributions if n.startswith("layer.")]
    choices = [c for c in space.distributions[slots[0]].choices if c != "skip"]
    top = {n: d.high for n, d in space.distributions.items() if not n.startswith("layer.")}
    return {c: space.candidate({**top, **{n: c for n in slots}}) for c in choices}


def reference_point(config: Any, worker: Any, names: list[str], directions: list[str]) -> np.ndarray:
    """Accuracy 0 per task; each cost :data:`L1_MARGIN` × its largest value over :func:`full_depth_plans` (scored
    here, before any search), as search_quality takes 1.1 × the l1 of its space's largest-weight plan."""
    costs = {n: 0.0 for n, d in zip(names, directions, strict=True) if d == "minimize"}
    for plan in full_depth_plans(config).values():
        values, _ = worker.evaluate(plan)
        costs = {n: max(c, values[n]) for n, c in costs.items()}
    return np.array([L1_MARGIN * costs[n] if d == "minimize" else 0.0 for n, d in zip(names, directions,
                                                                                          strict=True)])


def history(values: np.ndarray, directions: list[str], ref: np.ndarray, scale: float) -> list[float]:
    """Normalised hypervolume of the first k rows of ``values`` ``(n, m)``, k = 1..n (NaN rows: failed trials)."""
    from mergesearch.search.pareto import hypervolume, non_dominated

    sign = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    out, front, hv = [], np.zeros((0, values.shape[1])), 0.0
    for row in values:
        # only a row no front point weakly dominates changes the volume (one HV computation each)
        if np.all(np.isfinite(row)) and not np.all(front * sign <= row * sign, axis=1).any():
            front = np.vstack([front, row])
            front = front[non_dominated(front, directions)]
            hv = hypervolume(front, directions, ref) / scale
        out.append(hv)
    return out


def run_one(config: Any, worker: Any, optimizer: str, seed: int, budget: int,
            options: dict[str, Any], seconds: float | None = None) -> tuple[dict[str, Any], Any]:
    """One search of ``budget`` completed trials on an in-memory study; values in trial order (NaN = failed).
    With ``seconds``, the search stops cleanly (as on Ctrl-C: SIGALRM raises KeyboardInterrupt, which the search
    loop catches) once that much wall time has passed, with the trials completed by then (``stopped_by_time``).

    Returns:
        The run's record and its :class:`~mergesearch.search.loop.SearchRun` (its study and sampler).
    """
    import optuna

    from mergesearch.execution.local import LocalExecutor
    from mergesearch.search.loop import SearchRun

    config = config.model_copy(update={"search": config.search.model_copy(update={"options": options})})
    run = SearchRun(config, storage="memory://", study_name=f"{optimizer}-s{seed}", trials=budget,
                    optimizer=optimizer, seed=seed)
    start = time.perf_counter()
    if seconds:
        import signal

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        report = run.run(LocalExecutor(lambda: worker))  # the same resident worker for every run: models load once
    finally:
        if seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    done = [t for t in sorted(run.study.get_trials(deepcopy=False), key=lambda t: t.number)
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    m = len(run.objectives)
    values = [list(t.values) if t.state == optuna.trial.TrialState.COMPLETE else [float("nan")] * m for t in done]
    worker_time = sum(float(t.user_attrs.get("timings", {}).get(k, 0.0)) for t in done for k in ("merge", "eval"))
    fallbacks = sum("proposal_fallback" in t.user_attrs for t in done)
    return {"seed": seed, "values": values, "elapsed": elapsed, "optimizer_seconds": elapsed - worker_time,
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in done), "fallbacks": fallbacks,
            "stopped_by_time": bool(report.interrupted), "time_limit": seconds,
            "summaries": [t.user_attrs.get("summary", "") for t in done]}, run


def preferences(n: int, m: int) -> np.ndarray:
    """``(n, m)`` preference vectors from Dirichlet(1), from :data:`PREFERENCE_SEED` only (rounded to 3 digits)."""
    w = np.round(np.random.default_rng(PREFERENCE_SEED).dirichlet(np.ones(m), n), 3)
    w = np.maximum(w, 0.0)
    return w / w.sum(1, keepdims=True)


def top_rank(front_size: int) -> int:
    """The worst rank still in the top :data:`TOP` of a front of ``front_size`` trials."""
    return max(1, math.ceil(TOP * front_size))


def suggest_ranks(run: Any, worker: Any, names: list[str], prefs: np.ndarray) -> list[dict[str, Any]]:
    """For each preference: ``suggest``'s proposal from the run's final networks, scored, ranked on a copy of
    the run's study (final front plus the proposal) as ``mergesearch suggest`` reports it."""
    import optuna

    from mergesearch.search.suggest import SUGGESTED_ATTR, report

    sampler = run.optimizer.sampler
    out = []
    for w in prefs:
        weights = dict(zip(names, map(float, w), strict=True))
        start = time.perf_counter()
        params = sampler.suggest(run.study, w)
        seconds = time.perf_counter() - start
        values, _ = worker.evaluate(run.space.candidate(params))
        storage = optuna.storages.InMemoryStorage()
        optuna.copy_study(from_study_name=run.study.study_name, from_storage=run.study._storage, to_storage=storage)
        study = optuna.load_study(study_name=run.study.study_name, storage=storage)
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=run.space.distributions, values=[values[n] for n in names],
            user_attrs={SUGGESTED_ATTR: weights}))
        rep = report(study, params, weights, run.space.summary(params))
        stored = any(t.params == params for t in run.study.get_trials(deepcopy=False))
        out.append({"weights": weights, "summary": rep.summary, "values": rep.values, "on_front": rep.on_front,
                    "stored": stored,
                    "rank": rep.rank, "front_size": rep.front_size, "suggest_seconds": seconds,
                    "top": rep.rank is not None and rep.rank <= top_rank(rep.front_size)})
    return out


def summarize(runs: dict[str, list[dict[str, Any]]], suggestions: list[dict[str, Any]], checkpoints: list[int],
              n_prefs: int) -> dict[str, Any]:
    """HV at each checkpoint (mean ± sd over seeds) and both targets."""
    hv: dict[str, dict[str, Any]] = {}
    for opt, rs in runs.items():
        hv[opt] = {}
        for c in checkpoints:
            xs = [r["hv"][c - 1] for r in rs if len(r["hv"]) >= c]
            if xs:
                hv[opt][str(c)] = {"mean": float(np.mean(xs)), "sd": float(np.std(xs, ddof=1)) if len(xs) > 1
                                   else 0.0, "seeds": len(xs)}
    out: dict[str, Any] = {"hypervolume": hv}
    last = str(max(checkpoints))
    if "hm3" in hv and last in hv["hm3"] and len(runs) > 1:  # alone, hm3 is compared with nothing
        others = {o: v[last]["mean"] for o, v in hv.items() if o != "hm3" and last in v}
        best = max(others, key=others.__getitem__) if others else None
        mine = hv["hm3"][last]["mean"]
        # a run stopped earlier still bounds its optimizer from below: its HV never decreases with evaluations
        short = {o: float(np.mean([r["hv"][-1] for r in rs])) for o, rs in runs.items()
                 if o != "hm3" and o not in others}
        beaten_by = sorted(o for o, lower in short.items() if lower > mine)
        out["target_hv"] = {"at": int(last), "hm3": mine, "best_other": best, "best_other_hv": others.get(best),
                            "compared": sorted(others), "missing": sorted(short), "missing_final_hv": short,
                            "missing_already_above": beaten_by,
                            "met": (best is None or mine >= others[best]) and not beaten_by}
    if suggestions:
        per_seed = {}
        for s in suggestions:
            per_seed.setdefault(s["seed"], []).append(s["top"])
        need = math.ceil(0.8 * n_prefs)
        counts = {str(k): int(sum(v)) for k, v in per_seed.items()}
        novel = {}
        for s in suggestions:
            novel.setdefault(str(s["seed"]), 0)
            novel[str(s["seed"])] += int(not s.get("stored", False))
        out["target_suggest"] = {"top_fraction": TOP, "needed_per_seed": need, "top_per_seed": counts,
                                 "new_plans_per_seed": novel,
                                 "met": all(c >= need for c in counts.values()),
                                 "ranks": [s["rank"] for s in suggestions],
                                 "off_front": int(sum(not s["on_front"] for s in suggestions))}
    return out


def table(summary: dict[str, Any], suggestions: list[dict[str, Any]], checkpoints: list[int]) -> str:
    lines = ["normalised hypervolume at N evaluations, mean ± sd over seeds (seeds in brackets)",
             "optimizer".ljust(12) + "".join(f"{c:>22}" for c in checkpoints)]
    for opt, v in summary["hypervolume"].items():
        cells = [f"{v[str(c)]['mean']:.4f} ± {v[str(c)]['sd']:.4f} ({v[str(c)]['seeds']})" if str(c) in v else "—"
                 for c in checkpoints]
        lines.append(opt.ljust(12) + "".join(f"{x:>22}" for x in cells))
    t = summary.get("target_hv")
    if t:
        lines.append(f"target: hm3 >= the best other optimizer at {t['at']} evaluations ({t['best_other']} "
                     f"{t['best_other_hv'] if t['best_other_hv'] is None else round(t['best_other_hv'], 4)}; "
                     f"hm3 {t['hm3']:.4f}) -> {'MET' if t['met'] else 'NOT met'}"
                     + "".join(f"; {o} not run to {t['at']}: its final HV {v:.4f} is a lower bound there"
                               + (", already above hm3" if o in t["missing_already_above"] else "")
                               for o, v in t["missing_final_hv"].items()))
    if suggestions:
        lines.append("suggest for preferences not used in training: rank by the preference's ASF within the final "
                     "front (with the proposal), per seed")
        for s in suggestions:
            w = ", ".join(f"{n}={x:.2f}" for n, x in s["weights"].items())
            where = (f"rank {s['rank']:>2} of {s['front_size']:>2}" if s["on_front"]
                     else f"off the front ({s['front_size']})")
            again = "stored" if s.get("stored") else "new   "
            lines.append(f"  seed {s['seed']}  {w:<44} {where}  {'top' if s['top'] else '   '}  {again}  "
                         f"{s['summary']}")
        ts = summary["target_suggest"]
        n = len(suggestions) // max(1, len(ts["top_per_seed"]))
        lines.append(f"target: in the top {TOP:.0%} for >= {ts['needed_per_seed']} of {n} preferences in every seed "
                     f"(per seed: {ts['top_per_seed']}) -> {'MET' if ts['met'] else 'NOT met'}; new plans (not a "
                     f"stored trial suggested again) per seed: {ts.get('new_plans_per_seed')}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST, FIRST + 1, ... (default 0)")
    p.add_argument("--budget", type=int, default=max(CHECKPOINTS), help="evaluations per run")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    p.add_argument("--seeds-for", action="append", default=[], metavar="NAME=N",
                   help="fewer seeds for one optimizer (e.g. gp=1, whose asks cost seconds each); repeatable")
    p.add_argument("--budget-for", action="append", default=[], metavar="NAME=N",
                   help="another budget for one optimizer; repeatable")
    p.add_argument("--time-for", action="append", default=[], metavar="NAME=SECONDS",
                   help="wall-time limit of each run of one optimizer (e.g. gp=1800): the run stops cleanly then and "
                        "is reported with the evaluations it completed; repeatable")
    p.add_argument("--checkpoints", default=",".join(map(str, CHECKPOINTS)))
    p.add_argument("--preferences", type=int, default=10, help="preference vectors given to suggest (0: none)")
    p.add_argument("--hm3-options", default="{}", help="JSON object of hm3 options (default: its defaults)")
    p.add_argument("--initial", default="", type=lambda s: [x for x in s.split(",") if x],
                   help="search.initial of every run: comma-separated preset names, e.g. path:merged,path:base "
                        "(default none)")
    p.add_argument("--limit", type=int, default=None, help="examples per task objective (default: the demo's)")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="hm3.json", help="result file name under OUT (default hm3.json)")
    p.add_argument("--merge", action="append", default=[], type=Path, metavar="FILE",
                   help="add the runs of another result file of this script (same reference point, limit, space "
                        "and preferences; e.g. gp seeds run as separate processes) for optimizers not run here; "
                        "repeatable")
    p.add_argument("--summary-only", action="store_true",
                   help="recompute the summary and table of OUT/hm3.json from its stored runs (no search)")
    args = p.parse_args(argv)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    args.checkpoints = sorted(int(c) for c in args.checkpoints.split(",") if c.strip())
    args.hm3_options = json.loads(args.hm3_options)

    def per(items: list[str], default: int, flag: str) -> dict[str, int]:
        out = {o: default for o in args.optimizers}
        for item in items:
            name, _, n = item.partition("=")
            if name not in out or not n.isdigit():
                p.error(f"{flag} {item!r}: expected NAME=N with NAME one of {', '.join(args.optimizers)}")
            out[name] = int(n)
        return out

    args.budgets = per(args.budget_for, args.budget, "--budget-for")
    args.n_seeds = per(args.seeds_for, args.seeds, "--seeds-for")
    args.seconds = {o: None for o in args.optimizers}
    args.seconds.update({o: n or None for o, n in per(args.time_for, 0, "--time-for").items() if n})
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import optuna
    import torch

    from mergesearch.execution.worker import MergeWorker
    from mergesearch.search.loop import objective_specs

    args = parse_args(argv)
    if args.summary_only:
        record = json.loads((args.out / args.name).read_text())
        record["summary"] = summarize(record["runs"], record["suggestions"], record["checkpoints"],
                                      len(record["preferences"]))
        record["table"] = table(record["summary"], record["suggestions"], record["checkpoints"])
        (args.out / args.name).write_text(json.dumps(record, indent=1) + "\n")
        print(record["table"])
        return record
    wall = time.perf_counter()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    config = demo_config(args.demo_dir, args.limit)
    worker = MergeWorker(config)  # built once, shared by every run
    objectives = objective_specs(config)
    names, directions = [n for n, _ in objectives], [d for _, d in objectives]
    ref = reference_point(config, worker, names, directions)  # before any search
    scale = float(np.prod(np.where(np.array(directions) == "maximize", 1.0 - ref, ref)))
    config = config.model_copy(update={"search": config.search.model_copy(update={
        "reference_point": dict(zip(names, map(float, ref), strict=True)), "initial": args.initial})})
    prefs = preferences(args.preferences, len(names)) if args.preferences else np.zeros((0, len(names)))
    record: dict[str, Any] = {
        "space_config": config.space.model_dump(mode="json", by_alias=True), "objectives": objectives,
        "limit": args.limit, "reference_point": dict(zip(names, map(float, ref), strict=True)),
        "hv_normaliser": scale, "seeds": args.n_seeds, "budgets": args.budgets, "time_limits": args.seconds,
        "checkpoints": args.checkpoints, "initial": args.initial,
        "argv": sys.argv[1:] if argv is None else list(argv), "hm3_options": args.hm3_options,
        "preferences": prefs.tolist(), "preference_seed": PREFERENCE_SEED,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "runs": {}, "suggestions": [], "errors": {},
    }
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    suggestions: list[dict[str, Any]] = []
    for opt in args.optimizers:
        for seed in range(args.first_seed, args.first_seed + args.n_seeds[opt]):
            try:
                r, run = run_one(config, worker, opt, seed, args.budgets[opt], args.hm3_options if opt == "hm3"
                                 else {}, args.seconds[opt])
                if opt == "hm3" and len(prefs):
                    found = suggest_ranks(run, worker, names, prefs)
                    suggestions += [{"seed": seed, **s} for s in found]
            except Exception as e:  # one optimizer crashing must not lose the others' results
                import traceback

                record["errors"][f"{opt}/seed{seed}"] = traceback.format_exc()
                print(f"{opt} seed {seed}: CRASHED {type(e).__name__}: {e}", file=sys.stderr)
                break
            r["hv"] = history(np.array(r["values"], dtype=float), directions, ref, scale)
            runs.setdefault(opt, []).append(r)
            at = [f"HV@{c} {r['hv'][c - 1]:.4f}" for c in args.checkpoints if c <= len(r["hv"])]
            print(f"[{time.perf_counter() - wall:6.0f} s] {opt:7} seed {seed}: {len(r['values'])} evals in "
                  f"{r['elapsed']:.0f} s (optimizer {r['optimizer_seconds']:.0f} s), {', '.join(at)}",
                  file=sys.stderr, flush=True)
            record.update(runs=runs, suggestions=suggestions, wall_seconds=time.perf_counter() - wall,
                          summary=summarize(runs, suggestions, args.checkpoints, len(prefs)))
            (out / args.name).write_text(json.dumps(record, indent=1) + "\n")  # partial results too
    merged_seeds: dict[str, list[int]] = {}
    for path in args.merge:
        other = json.loads(path.read_text())
        for key in ("reference_point", "limit", "space_config", "objectives", "checkpoints", "initial"):
            if other.get(key, []) != json.loads(json.dumps(record[key])):  # as stored (tuples become lists)
                raise SystemExit(f"--merge {path}: its {key} differs from this run's")
        if other["suggestions"] and "hm3" not in args.optimizers:
            if len(record["preferences"]) and other["preferences"] != json.loads(json.dumps(record["preferences"])):
                raise SystemExit(f"--merge {path}: its preferences differ from this run's")
            record["preferences"] = other["preferences"]
            suggestions += other["suggestions"]
        for opt, rs in other["runs"].items():
            if opt in args.optimizers:
                continue
            runs.setdefault(opt, []).extend(rs)
            merged_seeds.setdefault(opt, []).extend(r["seed"] for r in rs)
            record["budgets"][opt] = other["budgets"][opt]
        record["errors"].update(other.get("errors", {}))
        record.setdefault("merged_from", []).append({"file": str(path), "wall_seconds": other.get("wall_seconds"),
                                                     "machine": other.get("machine")})
    for opt, seeds in merged_seeds.items():
        record["seeds"][opt] = len(seeds)
    record.update(runs=runs, suggestions=suggestions,
                  summary=summarize(runs, suggestions, args.checkpoints, len(record["preferences"])))
    record["table"] = table(record["summary"], suggestions, args.checkpoints)
    record["wall_seconds"] = time.perf_counter() - wall
    (out / args.name).write_text(json.dumps(record, indent=1) + "\n")
    print(record["table"])
    print(f"wall time {record['wall_seconds']:.0f} s")
    return record


if __name__ == "__main__":
    main()
