"""Search quality on the demo: hypervolume versus number of evaluations, per optimizer, against hand-tuned merges.

Every optimizer searches the same space (``--space weights``, the default: the demo's per-model task-arithmetic
weights in [0, 1]; ``--space ties``: task arithmetic or TIES, per-model weights and densities, and λ, so both
baseline families lie inside it; ``--space layers``: task-arithmetic weights per model, layer and
self_attn/mlp/rest, 36 parameters) for 3 exact-match objectives (reverse, swap, sort; maximised) and the L1
distance from the base (minimised), over ``--seeds`` seeds each. Studies live in memory and one resident worker
(models loaded once) evaluates every trial of every run. ``--initial`` starts every run (random included) with
the baselines that lie inside the space, as ``search.initial`` points counted in the budget: the search that a
user who already has hand-tuned recipes would run.

Hypervolumes use ONE reference point, fixed before any search: accuracy 0 on every task and l1 = 1.1 x the l1
of the largest-weight plan (task arithmetic, every weight 1). They are reported normalised by the volume of the
box [0, 1]^3 x [0, l1_ref] (1.0 = a perfect model at zero cost). Baselines: uniform task arithmetic
(every weight = λ, λ = 0.1..1.0) and TIES (weight 1, density 0.5, λ = 0.1..1.0; λ = 1 is the default recipe).
For each baseline the table gives the seeds whose front weakly dominates it (in round brackets: strictly, i.e.
better somewhere; in square brackets: strictly, by the searched points alone, without the ``--initial`` ones) and ε, the
smallest amount (in units of the box's sides: accuracy, l1 / l1_ref) by which the worst seed's front misses it;
``--reach N`` adds how many of N Sobol points of the space dominate it (what is reachable at all), ``--reach-local K``
K points around each baseline inside the space (whether a local search could improve on it; ``--reach-sigma``
sets their step). ``--refine K`` turns on ``search.refine`` for the multi-objective optimizers: the last K
evaluations of each run polish the front, the ``--initial`` baselines first. Runs longer than 60 evaluations
are checked against the baselines twice, at 60 and at their end. ``--held-out`` re-scores, on the test split,
each baseline and the first searched point of each run that strictly dominates it on the search split.

    OMP_NUM_THREADS=1 python benchmarks/search_quality.py [--seeds 3] [--budget 180] [--optimizers a,b]
        [--budget-for qnehvi=120] [--space weights|ties|layers] [--initial] [--reach 2048]
        [--reach-local 40] [--reach-sigma 0.05] [--refine 60] [--held-out] [--resume]
        [--merge OTHER.json] [--quick]

Writes ``benchmarks/results/search_quality.{json,png}`` (``--out DIR`` elsewhere) and prints the table. Two
processes can share the work: run a subset with ``--out`` elsewhere, then ``--resume --merge DIR/search_quality.json``
in the main one (only missing optimizer/seed pairs run; the merged runs are kept).
"""

from __future__ import annotations

import argparse
import json
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
ALL_OPTIMIZERS = ["random", "cmaes-sum", "tpe", "nsga2", "nsga3", "pymoo-nsga3", "pymoo-smsemoa", "gp", "qnehvi"]
#: single-objective or unguided: excluded when picking "the best multi-objective optimizer"
REFERENCE_OPTIMIZERS = ("random", "cmaes-sum")
AT = 60  # the evaluation budget the targets are checked at
LAMBDAS = [round(0.1 * k, 1) for k in range(1, 11)]
LOCAL_SIGMA = 0.05  # --reach-local: default step (unit-cube sd) of the points around each baseline


def space_config(kind: str) -> Any:
    """The searched space: ``weights`` (the demo's) or ``ties`` (task arithmetic | TIES with densities)."""
    from mergesearch.config import Range, SpaceConfig

    if kind == "weights":
        return SpaceConfig(methods=["task_arithmetic"], granularity="global", weight=Range(low=0.0, high=1.0))
    if kind == "layers":
        return SpaceConfig(methods=["task_arithmetic"], granularity="per_layer", filters=["self_attn", "mlp"],
                           weight=Range(low=0.0, high=1.0))
    # λ is searched too: TIES normalises its weights, so only λ scales its task vector (and its cost)
    return SpaceConfig(methods=["task_arithmetic", "ties"], granularity="global", weight=Range(low=0.0, high=1.0),
                       density=Range(low=0.1, high=1.0), lambda_=Range(low=0.0, high=1.0))


def demo_config(demo_dir: Path, kind: str) -> Any:
    """The demo job under ``demo_dir`` (built first if absent) with the benchmark's space and a local executor."""
    from mergesearch.config import load_config
    from mergesearch.demo.build import build_demo

    if not (demo_dir / "demo.yaml").is_file():  # an existing build (any recipe) is used as it is
        build_demo(demo_dir, progress=lambda m: print(m, file=sys.stderr))
    config = load_config(demo_dir / "demo.yaml")
    return config.model_copy(update={"space": space_config(kind),
                                     "execution": config.execution.model_copy(update={"executor": "local"})})


def baseline_recipes() -> dict[str, tuple[str, dict[str, float]]]:
    """The hand-tuned baselines: name -> (method, the value of every weight / density / λ)."""
    out = {f"task_arithmetic w={lam}": ("task_arithmetic", {"weight": lam, "lambda": 1.0}) for lam in LAMBDAS}
    out.update({f"ties d=0.5 λ={lam}": ("ties", {"weight": 1.0, "density": 0.5, "lambda": lam}) for lam in LAMBDAS})
    return out


def recipe_params(space: Any, method: str, values: dict[str, float]) -> dict[str, Any] | None:
    """``space``'s params for a recipe that sets every per-model and shared parameter uniformly, or None when
    the recipe lies outside the space (method not searched, a value outside its range, or a parameter the space
    does not search set to something else than its neutral value)."""
    if method not in space.methods:
        return None
    searched = {key.split(".")[0] for key in space.distributions}
    if any(q not in searched and v != space.neutral(q) for q, v in values.items()):
        return None
    p: dict[str, Any] = {"method": method} if "method" in space.distributions else {}
    for key, dist in space.distributions.items():
        q = key.split(".")[0]
        if q in values:
            if not dist.low <= values[q] <= dist.high:
                return None
            p[key] = values[q]
    return space.complete(p)


def space_of(config: Any, space_config: Any = None) -> Any:
    """The :class:`MergeSpace` of ``config``'s models for ``space_config`` (default: the searched one)."""
    from mergesearch.spaces import build_space, num_layers_of

    return build_space(space_config or config.space, base_model=config.base_model, models=list(config.models),
                       num_layers=num_layers_of(config.base_model), dtype=config.dtype)


def baseline_params(config: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """A decoding space holding both hand-tuned families, and their params by baseline name."""
    from mergesearch.config import Range, SpaceConfig

    space = space_of(config, SpaceConfig(methods=["task_arithmetic", "ties"], weight=Range(low=0.0, high=1.0),
                                         density=Range(low=0.0, high=1.0), lambda_=Range(low=0.0, high=1.0)))
    return space, {b: recipe_params(space, m, v) for b, (m, v) in baseline_recipes().items()}


def initial_points(space: Any) -> dict[str, dict[str, Any]]:
    """The baselines that lie inside ``space``, as its params (for ``search.initial``)."""
    found = {b: recipe_params(space, m, v) for b, (m, v) in baseline_recipes().items()}
    return {b: p for b, p in found.items() if p is not None}


def evaluate_baselines(config: Any, worker: Any, names: list[str]) -> dict[str, list[float]]:
    """Objective values (in ``names`` order) of every hand-tuned baseline."""
    space, params = baseline_params(config)
    return {b: [worker.evaluate(space.decode(p).to_dict())[0][n] for n in names] for b, p in params.items()}


def reachability(config: Any, worker: Any, names: list[str], directions: list[str], baselines: dict[str, list[float]],
                 sides: np.ndarray, n: int, local: int = 0, sigma: float = LOCAL_SIGMA) -> dict[str, Any]:
    """What the searched space can reach: ``n`` scrambled Sobol points (seed 0) of it plus ``local`` points
    around each baseline inside it (its float coordinates in the unit cube moved by N(0, sigma²), its
    method kept), and per baseline how many of all these points weakly dominate it and their :func:`shortfall`."""
    from optuna.distributions import FloatDistribution

    from mergesearch.search.optimizers.base import sobol
    from mergesearch.search.unit import from_unit, to_unit

    space = space_of(config)
    dists = space.distributions
    moves = np.array([isinstance(d, FloatDistribution) for d in dists.values()])
    rng = np.random.default_rng(0)
    points = list(sobol(n, len(dists), 0)) if n else []
    around = initial_points(space) if local else {}
    for p in around.values():
        x = to_unit(p, dists)
        points += [np.where(moves, x + rng.normal(0.0, sigma, x.shape), x) for _ in range(local)]
    start = time.perf_counter()
    values = []
    for x in points:
        v = worker.evaluate(space.decode(from_unit(x, dists)).to_dict())[0]
        values.append([float(v[k]) for k in names])
    arr = np.array(values)
    s = signs(directions)
    per = {b: {"dominated_by": int(np.all(arr * s <= np.array(v) * s, axis=1).sum()),
               "epsilon": shortfall(np.array(v), arr, directions, sides)} for b, v in baselines.items()}
    return {"points": n, "local": local, "local_sigma": sigma, "local_around": list(around),
            "seconds": time.perf_counter() - start, "per_baseline": per, "values": values}


def held_out(config: Any, worker: Any, runs: list[dict[str, Any]], baselines: dict[str, list[float]],
             names: list[str], directions: list[str], n_initial: int) -> dict[str, Any]:
    """Does search-split dominance hold on the held-out test split? Each baseline and, per run (those that
    stored plans), the first searched point that strictly dominates it on the search split are re-scored on
    every objective's ``test`` file; counted: the runs where that point still weakly / strictly dominates."""
    from mergesearch.merging.plan import MergePlan
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate

    objectives = build_objectives(config.objectives, ObjectiveContext(base_state=worker.merger.base_state,
                                                                      split="test"))

    def test_values(plan: dict[str, Any]) -> list[float]:
        v = evaluate(objectives, worker.merger.apply(MergePlan.model_validate(plan)), worker.tokenizer)
        return [float(v[n]) for n in names]

    space, params = baseline_params(config)
    out: dict[str, Any] = {}
    for b, v in baselines.items():
        base_test = test_values(space.decode(params[b]).to_dict())
        checks = []
        for r in (r for r in runs if r.get("plans")):
            hit = next((i for i in range(n_initial, len(r["values"]))
                        if strictly_dominated(np.array(v), np.array([r["values"][i]]), directions)), None)
            if hit is not None:
                t = np.array([test_values(r["plans"][hit])])
                checks.append({"seed": r["seed"], "trial": hit, "test": t[0].tolist(),
                               "weakly": weakly_dominated(np.array(base_test), t, directions),
                               "strictly": strictly_dominated(np.array(base_test), t, directions)})
        out[b] = {"test": base_test, "checks": checks, "weakly": sum(c["weakly"] for c in checks),
                  "strictly": sum(c["strictly"] for c in checks)}
    return out


def signs(directions: list[str]) -> np.ndarray:
    """+1 for minimised, -1 for maximised objectives."""
    return np.array([-1.0 if d == "maximize" else 1.0 for d in directions])


def weakly_dominated(point: np.ndarray, front: np.ndarray, directions: list[str]) -> bool:
    """True if some row of ``front`` (``(n, m)``) is at least as good as ``point`` (``(m,)``) everywhere."""
    s = signs(directions)
    return bool(len(front)) and bool(np.all(front * s <= point * s, axis=1).any())


def strictly_dominated(point: np.ndarray, front: np.ndarray, directions: list[str]) -> bool:
    """Some row of ``front`` is at least as good as ``point`` everywhere and better somewhere."""
    s = signs(directions)
    better_eq = np.all(front * s <= point * s, axis=1)
    return bool(np.any(better_eq & np.any(front * s < point * s, axis=1)))


def shortfall(point: np.ndarray, front: np.ndarray, directions: list[str], sides: np.ndarray) -> float:
    """Smallest additive ε by which some row of ``front`` (``(n, m)``) misses weakly dominating ``point``
    (``(m,)``), each objective measured in units of its side ``sides`` (``(m,)``) of the normalised HV box;
    0.0 when ``point`` is weakly dominated, inf for an empty front."""
    if not len(front):
        return float("inf")
    s = signs(directions)
    gap = np.maximum(0.0, (front - point) * s) / sides  # (n, m) how much worse each row is, per objective
    return float(gap.max(axis=1).min())


def box_sides(ref: np.ndarray, directions: list[str]) -> np.ndarray:
    """``(m,)`` sides of the normalised HV box: [ref, 1] for maximised accuracies, [0, ref] for minimised costs."""
    return np.where(signs(directions) < 0, 1.0 - ref, ref)


def history(values: np.ndarray, directions: list[str], ref: np.ndarray, scale: float) -> list[float]:
    """Normalised hypervolume of the first k rows of ``values`` (``(n, m)``), k = 1..n (NaN rows = failed)."""
    from mergesearch.search.pareto import hypervolume, non_dominated

    out, front, hv = [], np.zeros((0, values.shape[1])), 0.0
    for row in values:
        if np.all(np.isfinite(row)) and not weakly_dominated(row, front, directions):
            front = np.vstack([front, row])
            front = front[non_dominated(front, directions)]
            hv = hypervolume(front, directions, ref) / scale
        out.append(hv)
    return out


def run_one(config: Any, worker: Any, optimizer: str, seed: int, budget: int) -> dict[str, Any]:
    """One search of ``budget`` completed trials on an in-memory study; values in trial order (NaN = failed).
    The reference optimizers run without ``search.refine``: they stay the plain yardsticks."""
    import optuna

    from mergesearch.execution.local import LocalExecutor
    from mergesearch.search.loop import SearchRun

    if optimizer in REFERENCE_OPTIMIZERS:
        config = config.model_copy(update={"search": config.search.model_copy(update={"refine": 0})})
    run = SearchRun(config, storage="memory://", study_name=f"{optimizer}-s{seed}", trials=budget,
                    optimizer=optimizer, seed=seed)
    start = time.perf_counter()
    run.run(LocalExecutor(lambda: worker))  # the same resident worker for every run: models load once
    elapsed = time.perf_counter() - start
    trials = sorted(run.study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)]
    m = len(run.objectives)
    values = [list(t.values) if t.state == optuna.trial.TrialState.COMPLETE else [float("nan")] * m for t in done]
    worker_time = sum(float(t.user_attrs.get("timings", {}).get(k, 0.0)) for t in done for k in ("merge", "eval"))
    errors = sorted({str(t.user_attrs.get("fail_reason")) for t in done if t.state == optuna.trial.TrialState.FAIL})
    return {"seed": seed, "values": values, "plans": [t.user_attrs.get("plan") for t in done], "elapsed": elapsed,
            "optimizer_seconds": elapsed - worker_time,
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in done), "errors": errors}


def first_reaching(curve: list[float], target: float) -> int | None:
    """1-based number of evaluations at which ``curve`` first reaches ``target`` (None: never)."""
    hit = np.nonzero(np.asarray(curve) >= target - 1e-12)[0]
    return int(hit[0]) + 1 if len(hit) else None


def summarize(runs: dict[str, list[dict[str, Any]]], baselines: dict[str, list[float]], directions: list[str],
              ref: np.ndarray, scale: float, at: int = AT, n_initial: int = 0) -> dict[str, Any]:
    """Curves (mean, sd over seeds), baseline hypervolumes, and the two targets checked at ``at`` evaluations:
    ``random`` needs >= 3 x ``at`` evaluations for the best multi-objective optimizer's HV at ``at``, and that
    optimizer's front at ``at`` weakly dominates every baseline point (per seed; ``epsilon``: the worst seed's
    :func:`shortfall`, 0 when dominated in every seed). The first ``n_initial`` evaluations of every run are the
    ``--initial`` baselines, which make the target true for themselves: ``by_search_in_seeds`` counts the seeds
    where the points after them (what the search found) strictly dominate the baseline. Runs longer than ``at``
    (e.g. with ``--refine``) are also checked at their end (``baseline_dominance_final``)."""
    from mergesearch.search.pareto import hypervolume

    def mean_curve(opt: str) -> list[float]:
        hs = [r["hv"] for r in runs[opt]]
        n = min(len(h) for h in hs)
        return list(np.mean([h[:n] for h in hs], axis=0))

    stats: dict[str, Any] = {}
    for opt, rs in runs.items():
        n = min(len(r["hv"]) for r in rs)
        curves = np.array([r["hv"][:n] for r in rs])
        stats[opt] = {"mean": curves.mean(axis=0).tolist(), "sd": curves.std(axis=0, ddof=1).tolist()
                      if len(rs) > 1 else [0.0] * n, "seeds": len(rs)}
    base_arr = {b: np.array(v) for b, v in baselines.items()}
    base_hv = {"task_arithmetic λ-grid": [b for b in baselines if b.startswith("task_arithmetic")],
               "ties d=0.5 λ-grid": [b for b in baselines if b.startswith("ties")],
               "ties default (w=1, d=0.5, λ=1)": ["ties d=0.5 λ=1.0"]}
    base_hv = {k: hypervolume(np.array([base_arr[b] for b in v]), directions, ref) / scale for k, v in base_hv.items()}
    single = {b: hypervolume(v[None], directions, ref) / scale for b, v in base_arr.items()}
    top = max(single, key=single.__getitem__)
    base_hv[f"best single ({top})"] = single[top]

    mo = [o for o in runs if o not in REFERENCE_OPTIMIZERS and len(stats[o]["mean"]) >= at]
    out: dict[str, Any] = {"curves": stats, "baseline_hypervolume": base_hv}
    if not mo:
        return out
    best = max(mo, key=lambda o: stats[o]["mean"][at - 1])
    target = stats[best]["mean"][at - 1]
    out["best_multi_objective"] = {"optimizer": best, "at": at, "hv": target}
    if "random" in runs:
        curve = mean_curve("random")
        need = first_reaching(curve, target)
        out["random_evals_to_reach"] = {"evaluations": need, "random_budget": len(curve),
                                        "needed": 3 * at, "target_met": need is None or need >= 3 * at}
    out["baseline_dominance"] = dominance(runs[best], base_arr, directions, ref, at, n_initial, best)
    end = min(len(r["values"]) for r in runs[best])
    if end > at:
        out["baseline_dominance_final"] = dominance(runs[best], base_arr, directions, ref, end, n_initial, best)
    return out


def dominance(runs: list[dict[str, Any]], baselines: dict[str, np.ndarray], directions: list[str], ref: np.ndarray,
              at: int, n_initial: int, optimizer: str) -> dict[str, Any]:
    """Per baseline: in how many of ``runs`` the first ``at`` evaluations weakly / strictly dominate it, and
    strictly by the points after the first ``n_initial`` (what the search found) alone; ``epsilon`` is the
    worst seed's :func:`shortfall`."""
    per_baseline = {}
    for b, point in baselines.items():
        hits, strict, searched, eps = [], [], [], []
        for r in runs:
            vals = np.array(r["values"][:at], dtype=float)
            found = vals[n_initial:][np.all(np.isfinite(vals[n_initial:]), axis=1)]
            vals = vals[np.all(np.isfinite(vals), axis=1)]
            hits.append(weakly_dominated(point, vals, directions))
            searched.append(strictly_dominated(point, found, directions))
            strict.append(strictly_dominated(point, vals, directions))
            eps.append(shortfall(point, vals, directions, box_sides(ref, directions)))
        per_baseline[b] = {"dominated_in_seeds": int(sum(hits)), "strictly_in_seeds": int(sum(strict)),
                           "by_search_in_seeds": int(sum(searched)), "seeds": len(hits), "epsilon": max(eps),
                           "values": point.tolist()}
    return {"optimizer": optimizer, "at": at, "per_baseline": per_baseline,
            "target_met": all(v["dominated_in_seeds"] == v["seeds"] for v in per_baseline.values()),
            "target_met_strictly": all(v["strictly_in_seeds"] == v["seeds"] for v in per_baseline.values()),
            "target_met_by_search": all(v["by_search_in_seeds"] == v["seeds"] for v in per_baseline.values())}


def dominance_lines(d: dict[str, Any], reach: dict[str, Any] | None) -> list[str]:
    """Table lines of one :func:`dominance` result (with the reachability columns when measured)."""
    lines = [f"baselines weakly (strictly) [strictly by searched points alone] dominated by {d['optimizer']}'s "
             f"front at {d['at']} evaluations (seeds):"]
    if reach:
        near = (f" and {reach['local']} points around each of the {len(reach['local_around'])} baselines "
                f"inside it (sd {reach.get('local_sigma', LOCAL_SIGMA)})" if reach.get("local") else "")
        lines.append(f"  (ε: worst seed's shortfall, in units of the HV box sides; reachable: how many of "
                     f"{reach['points']} Sobol points of the space{near} dominate it, and their ε)")
    for b, v in d["per_baseline"].items():
        vals = ", ".join(f"{x:.3g}" for x in v["values"])
        rb = reach["per_baseline"][b] if reach else None
        r = f"   reachable {rb['dominated_by']:>4} (ε {rb['epsilon']:.4f})" if rb else ""
        lines.append(f"  {b:<24} {v['dominated_in_seeds']}/{v['seeds']} ({v['strictly_in_seeds']}) "
                     f"[{v['by_search_in_seeds']}]  ε {v['epsilon']:.4f}{r}   ({vals})")
    verdict = ("MET strictly by searched points" if d.get("target_met_by_search")
               else "MET strictly" if d.get("target_met_strictly")
               else "MET only weakly, through the initial points" if d["target_met"] else "NOT met")
    lines.append(f"  -> target {verdict}")
    return lines


def table(summary: dict[str, Any], checkpoints: list[int]) -> str:
    """The optimizer x budget table (mean ± sd of the normalised hypervolume) plus baselines and targets."""
    curves = summary["curves"]
    w = max(len(o) for o in curves) + 5
    lines = ["normalised hypervolume by evaluations, mean ± sd over seeds (seeds in brackets)",
             "optimizer".ljust(w) + "".join(f"{c:>16}" for c in checkpoints)]
    for opt, s in curves.items():
        cells = [f"{s['mean'][c - 1]:.4f} ± {s['sd'][c - 1]:.4f}" if c <= len(s["mean"]) else "—"
                 for c in checkpoints]
        lines.append(f"{opt} ({s['seeds']})".ljust(w) + "".join(f"{x:>16}" for x in cells))
    lines.append("baselines: " + "; ".join(f"{k} {v:.4f}" for k, v in summary["baseline_hypervolume"].items()))
    if "best_multi_objective" in summary:
        b = summary["best_multi_objective"]
        lines.append(f"best multi-objective optimizer at {b['at']} evaluations: {b['optimizer']} (HV {b['hv']:.4f})")
    if "random_evals_to_reach" in summary:
        r = summary["random_evals_to_reach"]
        need = r["evaluations"] if r["evaluations"] is not None else f"> {r['random_budget']}"
        lines.append(f"evaluations random needs to reach it (mean curve): {need} -> target (>= {r['needed']}) "
                     f"{'MET' if r['target_met'] else 'NOT met'}")
    reach = summary.get("reachability")
    for key in ("baseline_dominance", "baseline_dominance_final"):
        if key in summary:
            lines += dominance_lines(summary[key], reach)
    if reach:
        alone = [b for b, v in reach["per_baseline"].items() if v["dominated_by"] == 0]
        lines.append(f"baselines that no reachable point dominates: {', '.join(alone) or 'none'}")
    if "held_out" in summary:
        h = summary["held_out"]
        checks = sum(len(v["checks"]) for v in h.values())
        lines.append(f"held-out check: per run, the first searched point that strictly dominates a baseline on the "
                     f"search split, re-scored on the test split, still dominates it weakly in "
                     f"{sum(v['weakly'] for v in h.values())} and strictly in "
                     f"{sum(v['strictly'] for v in h.values())} of {checks} cases")
        lines += [f"  {b:<24} weakly {v['weakly']}/{len(v['checks'])}, strictly {v['strictly']}/{len(v['checks'])}"
                  for b, v in h.items()]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    """HV vs evaluations: mean over seeds per optimizer (± sd band), baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for opt, s in summary["curves"].items():
        x, m, sd = np.arange(1, len(s["mean"]) + 1), np.array(s["mean"]), np.array(s["sd"])
        style = {"lw": 2.4, "ls": "--"} if opt in REFERENCE_OPTIMIZERS else {"lw": 1.6}
        (line,) = ax.plot(x, m, label=opt, **style)
        ax.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.12)
    styles = [("black", ":"), ("dimgray", "-."), ("saddlebrown", ":"), ("purple", "-.")]
    for i, (name, hv) in enumerate(summary["baseline_hypervolume"].items()):
        color, ls = styles[i % len(styles)]
        ax.axhline(hv, color=color, ls=ls, lw=1.3, label=f"baseline: {name}")
    ax.axvline(summary.get("best_multi_objective", {}).get("at", AT), color="black", lw=0.6, alpha=0.4)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("hypervolume (normalised)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def previous_runs(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The record an earlier invocation stored; its runs must share space and reference point with ``record``."""
    old = json.loads(path.read_text())
    same_ref = old.get("reference_point", {}).keys() == record["reference_point"].keys() and np.allclose(
        list(old["reference_point"].values()), list(record["reference_point"].values()), rtol=1e-6)
    if (old.get("space_config") != record["space_config"] or not same_ref
            or old.get("initial", []) != record["initial"] or old.get("refine", 0) != record["refine"]):
        raise SystemExit(f"{path} holds runs of another space, reference point, initial points or --refine; "
                         "use another --out")
    record["errors"].update(old.get("errors", {}))
    return old


def add_runs(runs: dict[str, list[dict[str, Any]]], more: dict[str, list[dict[str, Any]]]) -> None:
    """Add the runs of ``more`` whose optimizer/seed pair ``runs`` lacks (in place)."""
    for opt, rs in more.items():
        have = {r["seed"] for r in runs.get(opt, [])}
        runs.setdefault(opt, []).extend(r for r in rs if r["seed"] not in have)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget", type=int, default=180, help="evaluations per run")
    p.add_argument("--budget-for", action="append", default=[], metavar="NAME=N",
                   help="another budget for one optimizer (e.g. qnehvi=120); repeatable")
    p.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS))
    p.add_argument("--space", choices=["weights", "ties", "layers"], default="weights")
    p.add_argument("--initial", action="store_true",
                   help="enqueue the baselines that lie inside the space first (search.initial; they count "
                        "against the budget), for every optimizer")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/search_quality.json (same space and reference point); "
                        "run only the missing optimizer/seed pairs")
    p.add_argument("--merge", action="append", default=[], type=Path, metavar="JSON",
                   help="add the runs of another invocation's search_quality.json (same space and reference "
                        "point; e.g. one run in parallel with --out elsewhere); repeatable")
    p.add_argument("--reach", type=int, default=0, metavar="N",
                   help="also evaluate N Sobol points of the space: which baselines any reachable point dominates")
    p.add_argument("--reach-local", type=int, default=0, metavar="K",
                   help="also evaluate K points around each baseline inside the space (a local search's view)")
    p.add_argument("--reach-sigma", type=float, default=LOCAL_SIGMA, metavar="S",
                   help=f"unit-cube sd of the --reach-local moves (default {LOCAL_SIGMA})")
    p.add_argument("--refine", type=int, default=0, metavar="K",
                   help="search.refine: the last K evaluations of every multi-objective optimizer's run polish "
                        "the front (the --initial baselines first) with small local moves; random and cmaes-sum "
                        "stay plain")
    p.add_argument("--held-out", action="store_true",
                   help="re-score on the test split each baseline and the first searched point of each of the "
                        "best optimizer's runs that strictly dominates it")
    p.add_argument("--quick", action="store_true", help="1 seed, budget 30, random/tpe/cmaes-sum (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.budget, args.optimizers = 1, 30, "random,tpe,cmaes-sum"
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    budgets = {o: args.budget for o in args.optimizers}
    for item in args.budget_for:
        name, _, n = item.partition("=")
        if name not in budgets or not n.isdigit():
            p.error(f"--budget-for {item!r}: expected NAME=N with NAME one of {', '.join(args.optimizers)}")
        budgets[name] = int(n)
    args.budgets = budgets
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import optuna
    import torch

    from mergesearch.execution.worker import MergeWorker
    from mergesearch.search.loop import objective_specs

    args = parse_args(argv)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    config = demo_config(args.demo_dir, args.space)
    worker = MergeWorker(config)  # built once, shared by the baselines and every run
    objectives = objective_specs(config)
    names, directions = [n for n, _ in objectives], [d for _, d in objectives]

    baselines = evaluate_baselines(config, worker, names)
    largest = baselines["task_arithmetic w=1.0"]  # the largest-weight plan of the space: every weight 1
    ref = np.array([0.0 if d == "maximize" else 1.1 * largest[i] for i, d in enumerate(directions)])
    worst_baseline = max(v[names.index("l1")] for v in baselines.values())
    if worst_baseline >= ref[names.index("l1")]:
        print(f"warning: a baseline's l1 ({worst_baseline:.4g}) is beyond the reference point", file=sys.stderr)
    scale = float(np.prod(box_sides(ref, directions)))  # volume of [0,1]^3 x [0, l1_ref]
    initial = initial_points(space_of(config)) if args.initial else {}
    config = config.model_copy(update={"search": config.search.model_copy(update={
        "reference_point": dict(zip(names, map(float, ref), strict=True)), "initial": list(initial.values()),
        "refine": args.refine})})

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "space": args.space, "space_config": config.space.model_dump(mode="json", by_alias=True),
        "initial": list(initial), "refine": args.refine,
        "objectives": objectives, "reference_point": dict(zip(names, map(float, ref), strict=True)),
        "hv_normaliser": scale, "seeds": args.seeds, "budgets": args.budgets, "baselines": baselines,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "optuna": optuna.__version__,
                    "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()},
        "runs": {}, "errors": {},
    }
    runs: dict[str, list[dict[str, Any]]] = {}
    done_before = 0.0
    sources = [out / "search_quality.json"] if args.resume and (out / "search_quality.json").is_file() else []
    for path in sources + args.merge:
        old = previous_runs(path, record)
        add_runs(runs, old.get("runs", {}))
        done_before += float(old.get("elapsed", 0.0))  # compute seconds, summed over the merged invocations
        if old.get("reachability") and not (args.reach or args.reach_local):
            record["reachability"] = old["reachability"]
    if args.merge:
        record["merged_from"] = [str(m) for m in args.merge]
    t0 = time.perf_counter()
    if args.reach or args.reach_local:
        record["reachability"] = reachability(config, worker, names, directions, baselines, box_sides(ref, directions),
                                              args.reach, args.reach_local, args.reach_sigma)
        print(f"reachability: {len(record['reachability']['values'])} points in "
              f"{record['reachability']['seconds']:.0f} s", file=sys.stderr)

    def summary_of(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        out = summarize(runs, baselines, directions, ref, scale, at, len(record["initial"]))
        if "reachability" in record:
            out["reachability"] = {k: v for k, v in record["reachability"].items() if k != "values"}
        return out

    at = min(AT, max([args.budget] + [len(r["values"]) for rs in runs.values() for r in rs]))
    for opt in args.optimizers:
        for seed in range(args.seeds):
            if any(r["seed"] == seed for r in runs.get(opt, [])):
                continue
            try:
                r = run_one(config, worker, opt, seed, args.budgets[opt])
            except Exception as e:  # one optimizer crashing must not lose the others' results
                import traceback

                record["errors"][f"{opt}/seed{seed}"] = traceback.format_exc()
                print(f"{opt} seed {seed}: CRASHED {type(e).__name__}: {e}", file=sys.stderr)
                break
            r["hv"] = history(np.array(r["values"], dtype=float), directions, ref, scale)
            runs.setdefault(opt, []).append(r)
            print(f"[{time.perf_counter() - t0:7.0f} s] {opt:14} seed {seed}: {len(r['values'])} evals in "
                  f"{r['elapsed']:.0f} s (optimizer {r['optimizer_seconds']:.0f} s, failed {r['failed']}), "
                  f"HV@{min(at, len(r['hv']))} {r['hv'][min(at, len(r['hv'])) - 1]:.4f}, "
                  f"final {r['hv'][-1]:.4f}", file=sys.stderr, flush=True)
            record["runs"] = runs
            record["summary"] = summary_of(runs)
            record["elapsed"] = done_before + time.perf_counter() - t0
            record["budgets"] = {o: max(len(r["values"]) for r in rs) for o, rs in runs.items()}
            (out / "search_quality.json").write_text(json.dumps(record, indent=1) + "\n")  # partial results too

    record["runs"] = runs  # also when nothing new ran (a --resume/--merge that only combines)
    record["elapsed"] = done_before + time.perf_counter() - t0
    record["budgets"] = {o: max(len(r["values"]) for r in rs) for o, rs in runs.items()}
    record["seeds"] = max([len(rs) for rs in runs.values()] or [args.seeds])
    summary = record["summary"] = summary_of(runs)
    if args.held_out and "best_multi_objective" in summary:
        best = summary["best_multi_objective"]["optimizer"]
        summary["held_out"] = held_out(config, worker, runs[best], baselines, names, directions,
                                       len(record["initial"]))
    longest = max([len(r["values"]) for rs in runs.values() for r in rs] or [args.budget])
    checkpoints = sorted({*range(20, longest + 1, 20), at, longest})
    text = table(summary, checkpoints)
    record["table"] = text
    (out / "search_quality.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(summary, out / "search_quality.png", f"demo ({args.space} space): HV vs evaluations, mean ± sd over "
         f"{record['seeds']} seed(s); ref {', '.join(f'{n}={v:.4g}' for n, v in record['reference_point'].items())}")
    print(text)
    return record


if __name__ == "__main__":
    main()
