"""Twin-Merging vs static merges on the demo (issue 16, item 6): the best point of each front on the test split.

Target: the twin front holds a point with >= 0.95 of every expert's own-task test accuracy at <= 10 % extra
parameters.

Configuration of the recorded runs, fixed before each was run. The latest, ``twin_merging_fit.json``
(``--variants static,twin_distill_fit --name twin_merging_fit``), is the one below with ``twin_distill_fit`` in
place of ``twin_distill``: the same twin space plus ``fit_data``, so the router is trained and the factors are
distilled on 128 fresh prompts per task (``fit_files``: drawn with seed ``twin-fit``, distinct, disjoint from the
task's search and test files, written to ``DEMO_DIR/twin_fit/``) and every trial is scored on the search prompts
it was NOT fitted on. In ``twin_merging.json`` (``twin_distill``) the fit prompts were the search prompts
themselves: distilled twins scored ~0.99 on the search split, the front was decided by the cost axis alone, and
seed 2 kept a point that generalised badly. ``twin_merging_fit512.json`` (``--fit-prompts 512 --name
twin_merging_fit512``, decided after ``twin_merging_fit.json`` missed on seed 2, and stated before it ran): the same
with 512 fit prompts per task (``twin_fit_512/``; its first 128 are ``twin_fit/``'s), on the hypothesis that the
rank-1 factors overfit 128 prompts per task (in-sample search accuracy ~0.99, held-out ~0.94 on swap).
``twin_merging.json``'s configuration:

- Models: the FULL demo build (``mergesearch demo``'s models: 4 layers, hidden 64, 167,488 parameters; seed 0),
  in ``search_quality.DEMO_DIR`` (built there first if absent).
- Objectives: the demo's: exact match on reverse, swap and sort, and ``l1_from_base``, with ``limit`` removed,
  so the search split is all of its 128 examples per task (as in the demo) and the test split all of its 512.
  The twin searches add ``{type: extra_params, name: extra_params}``.
- Variants (``VARIANTS``): ``static``: the demo's space (task arithmetic, one weight per model in [0, 1]), 40
  trials. ``twin_distill``: the same space plus ``twin: {rank: 1, router: {width: 16}, distill: {}}`` (the
  default distillation: 100 Adam steps at lr 0.01 on batches of 96 sequences, temperature 4), 6 trials. Rank 1
  on every block weight with the width-16 router is 8.52 % extra, rank 2 is 16.3 % (``budget`` in the result
  file): rank 1 is the only rank under the cap, so it is fixed rather than searched, and the trials go to θ*'s
  weights. A distilled
  trial costs ~30 s on one busy core, and as much again for each front point re-scored on the test split
  (``validate_front`` rebuilds it), hence 6 trials to keep the run near 15 minutes; to make them count,
  each seed's twin search starts (``search.initial``) from the demo's two recipes plus the static run's best
  point of the same seed, chosen on the SEARCH split (weakest task normalised by the experts' search-split
  accuracy) — the shared expert of Twin-Merging is a good static merge, and a user can do the same.
  The same run with temperature 1 (before the temperature was chosen on the search split, see
  ``DistillSettings``) is kept in ``twin_merging_distill_t1.json``.
  ``twin`` / ``twin_w16`` (the paper's SVD factors, rank [1, 4], router width 64 / 16, 40 trials) were recorded
  by the previous version of this benchmark (``twin_merging_svd.json``, seeds 0 and 1) and can be rerun with
  ``--variants``.
- Search: the demo's settings (``tpe``; initial recipes ``uniform`` and every weight 0.5; ``refine`` =
  budget//4), seeds 0, 1 and 2 (``search.seed``: optimizer, twin SVD, distillation batches and router seed), one
  local worker (``LocalExecutor``, as ``search_quality.run_one``), torch threads 1, in-memory studies.

Measured per front (the study's Pareto front, re-scored on the test split with
``mergesearch.exporting.validate_front``): each task's test accuracy divided by its expert's own test accuracy
on that task (experts evaluated with the same objectives on the test split); the weakest task's ratio; the
point with the best weakest ratio and its extra-parameter ratio; the best weakest ratio among points with
extra ratio <= 0.10, and per twin rank. Extra ratios are computed exactly from the twin rank and the router
width (``true_extra_ratio``: all experts' factors plus the router's parameters and standardisation buffers, over
the static model's parameters: what the ``extra_params`` objective counts), checked against one built twin
model, and compared with the stored ``extra_params`` objective; where they disagree, the front is also
recomputed from every completed trial with the exact ratio (``corrected`` front) and re-scored too. Why a rank
falls short without distillation: ``exclusive_energy``, the share of each expert's ‖θt − θ*‖²_F that ranks 1, 2
and 4 keep, for uniform task-arithmetic shared merges. Evaluation cost: the trials' stored ``timings``
(``merge``: building the candidate, for twin the SVDs, the distillation and the router training; ``eval``:
scoring), seconds per trial. ``twin_merging.png`` plots every front point (test split) against its extra ratio,
with the previous SVD-only fronts from ``twin_merging_svd.json``.

    OMP_NUM_THREADS=1 python benchmarks/twin_merging.py [--seeds 0,1,2] [--budget 40] [--distill-budget 6]
        [--variants static,twin_distill_fit] [--name twin_merging_fit]

Writes ``benchmarks/results/NAME.json`` and ``NAME.png`` (``--name``, default ``twin_merging``; ``--out DIR``
elsewhere) and prints the table. ``--recompute`` redoes the extra ratios, selections, verdict and table of an
existing result file from its stored ranks and test scores (no search; the models are loaded to re-check one built
twin's ratio and to add ``exclusive_energy`` when the file lacks it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import search_quality as sq  # the demo build and its local-executor config

#: a variant's ``fit_data`` placeholder: the demo's fit prompts (:func:`fit_files`)
FIT_DATA = "demo-fit-prompts"
#: fit prompts per task by default (as many as the search split; ``--fit-prompts``) and the seed they are drawn with
FIT_PROMPTS = 128
FIT_SEED = "twin-fit"
TARGET_RATIO = 0.95
EXTRA_CAP = 0.10
MAX_RANK = 4
#: variant -> its ``space.twin`` (None: static merges only)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "static": None,
    "twin": {"rank": [1, MAX_RANK]},
    "twin_w16": {"rank": [1, MAX_RANK], "router": {"width": 16}},
    "twin_distill": {"rank": 1, "router": {"width": 16}, "distill": {}},
    # the same, fitted (router and distillation) on separate prompts: FIT_DATA, disjoint from search and test
    "twin_distill_fit": {"rank": 1, "router": {"width": 16}, "distill": {}, "fit_data": FIT_DATA},
}
DEFAULT_VARIANTS = "static,twin_distill_fit"
#: shared merges whose exclusive parts' spectra are recorded (``exclusive_energy``): per-model weights
ENERGY_MERGES = {"uniform 1/3": (1 / 3, 1 / 3, 1 / 3), "uniform 1/2": (0.5, 0.5, 0.5)}


# ------------------------------------------------------------------------------------------------ pure helpers

def normalised(test_values: Mapping[str, float], expert_accuracy: Mapping[str, float]) -> dict[str, float]:
    """Each task's accuracy divided by its expert's own accuracy on it (tasks: the keys of ``expert_accuracy``).

    Raises:
        ValueError: an expert scores 0 on its own task (nothing to normalise by).
    """
    out = {}
    for task, own in expert_accuracy.items():
        if own <= 0:
            raise ValueError(f"expert of {task!r} scores {own} on its own task")
        out[task] = float(test_values[task]) / float(own)
    return out


def weakest(ratios: Mapping[str, float]) -> float:
    """The weakest task's normalised score."""
    return min(ratios.values())


def best_point(points: Sequence[Mapping[str, Any]], cap: float | None = None) -> Mapping[str, Any] | None:
    """The point with the highest ``weakest`` among those with ``extra`` <= ``cap`` (all when None); ties go to
    the smaller ``extra``, then the earlier point. None when no point qualifies."""
    ok = [p for p in points if cap is None or p["extra"] <= cap + 1e-12]
    if not ok:
        return None
    return max(ok, key=lambda p: (p["weakest"], -p["extra"]))


def factor_params_per_rank(shapes: Mapping[str, Sequence[int]], experts: int) -> int:
    """Twin factor entries per unit of rank: Σ over the decoder layers' 2-D weights of T·(out + in)."""
    from mergesearch.models import layer_key

    return experts * sum(int(s[0]) + int(s[1]) for n, s in shapes.items()
                         if layer_key(n)[1] is not None and n.endswith(".weight") and len(s) == 2)


def router_params(hidden: int, width: int, experts: int) -> int:
    """Parameters of the router MLP (Linear(H, w), Linear(w, T))."""
    return hidden * width + width + width * experts + experts


def router_extra(hidden: int, width: int, experts: int) -> int:
    """What the router adds, as the ``extra_params`` objective counts it: its parameters plus its feature
    standardisation buffers (mean and scale, H each)."""
    return router_params(hidden, width, experts) + 2 * hidden


def true_extra_ratio(rank: int, per_rank: int, router: int, static: int) -> float:
    """(rank·per_rank + router) / static: what a twin candidate adds to its static model, relative to it
    (``router``: :func:`router_extra`)."""
    return (rank * per_rank + router) / static


def max_rank_under(cap: float, per_rank: int, router: int, static: int) -> int:
    """The largest rank whose extra ratio is <= ``cap`` (-1: not even rank 0, i.e. the router alone is over)."""
    return (int(cap * static) - router) // per_rank if cap * static >= router else -1


def timing_summary(timings: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean seconds per trial of ``merge``, ``eval`` and their sum, over trials with both recorded."""
    rows = [(float(t["merge"]), float(t["eval"])) for t in timings if "merge" in t and "eval" in t]
    if not rows:
        return {"trials": 0}
    n = len(rows)
    merge, ev = sum(r[0] for r in rows) / n, sum(r[1] for r in rows) / n
    return {"trials": n, "merge": merge, "eval": ev, "total": merge + ev}


# ------------------------------------------------------------------------------------------------ measurement

def fresh_inputs(task: str, n: int, exclude: set[str], seed: str, length: int) -> list[dict[str, str]]:
    """``n`` demo records of ``task`` with distinct prompts, none in ``exclude``, drawn from ``seed`` (stable)."""
    import random

    from mergesearch.demo.tasks import make_example

    rng = random.Random(f"{seed}:{task}")
    out: dict[str, dict[str, str]] = {}
    while len(out) < n:
        rec = make_example(task, tuple(rng.randrange(10) for _ in range(length)))
        if rec["prompt"] not in exclude:
            out.setdefault(rec["prompt"], rec)
    return list(out.values())


def fit_files(demo_dir: Path, objectives: Sequence[Any], n: int = FIT_PROMPTS) -> dict[str, Path]:
    """Task objective name -> ``demo_dir/twin_fit/{task}.jsonl`` (``twin_fit_{n}`` unless ``n`` is FIT_PROMPTS):
    ``n`` fresh prompts of the task, disjoint from its search and test files (written once; an existing file is
    checked, not rewritten). The draws are one stream per task, so a larger ``n`` extends a smaller one's set."""
    from mergesearch.demo.tasks import read_jsonl, write_jsonl

    out = {}
    for o in objectives:
        if o.data is None:
            continue
        taken = {r["prompt"] for path in (o.data, o.test) if path is not None for r in read_jsonl(Path(path))}
        path = demo_dir / ("twin_fit" if n == FIT_PROMPTS else f"twin_fit_{n}") / f"{o.label}.jsonl"
        if not path.is_file():
            length = len(next(iter(taken)).split()) - 2  # "<task> d1 .. dn =": the digits per input
            write_jsonl(path, fresh_inputs(o.label, n, taken, FIT_SEED, length))
        fit = {r["prompt"] for r in read_jsonl(path)}
        if fit & taken or len(fit) != n:
            raise SystemExit(f"{path}: not {n} distinct prompts disjoint from {o.label}'s search and test")
        out[o.label] = path
    return out


def fit_record(demo_dir: Path, objectives: Sequence[Any], variants: Sequence[str], n: int = FIT_PROMPTS
               ) -> dict[str, Any] | None:
    """What the result file says about the fit prompts (None: no variant uses them)."""
    if not any((VARIANTS[v] or {}).get("fit_data") == FIT_DATA for v in variants):
        return None
    files = fit_files(demo_dir, objectives, n)
    return {"files": {k: str(v) for k, v in files.items()}, "prompts_per_task": n, "seed": FIT_SEED,
            "disjoint_from": "each task's search and test files (checked)"}


def job_config(demo_dir: Path, variant: str, seed: int, budget: int,
               warm: Mapping[str, float] | None = None, fit_prompts: int = FIT_PROMPTS) -> Any:
    """The demo job for one variant and seed (see the module docstring); ``warm``: params of one more initial
    point (the static run's best), evaluated after the demo's recipes; ``fit_prompts``: per task, for variants
    with ``fit_data``."""
    from mergesearch.config import ObjectiveConfig, TwinSpace

    config = sq.demo_config(demo_dir, "weights")
    objectives = [o.model_copy(update={"limit": None}) for o in config.objectives]
    space = config.space
    if VARIANTS[variant] is not None:
        twin = dict(VARIANTS[variant])
        if twin.get("fit_data") == FIT_DATA:
            twin["fit_data"] = fit_files(demo_dir, objectives, fit_prompts)
        objectives.append(ObjectiveConfig(type="extra_params", name="extra_params"))
        space = space.model_copy(update={"twin": TwinSpace.model_validate(twin)})
    initial = [*config.search.initial, *([dict(warm)] if warm else [])]
    search = config.search.model_copy(update={"seed": seed, "trials": budget, "refine": max(1, budget // 4),
                                              "initial": initial})
    return config.model_copy(update={"objectives": objectives, "space": space, "search": search})


def router_width(variant: str) -> int | None:
    """The router width of a twin variant (None: static)."""
    twin = VARIANTS[variant]
    return None if twin is None else int(twin.get("router", {}).get("width", 64))


def expert_accuracy(config: Any, tasks: Sequence[str], split: str = "test") -> dict[str, dict[str, float]]:
    """``split`` scores of every expert (model ``i`` is task ``i``'s), with the job's task objectives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate

    objectives = build_objectives([o for o in config.objectives if (o.test if split == "test" else o.data) is not None],
                                  ObjectiveContext(split=split))
    tok = AutoTokenizer.from_pretrained(config.base_model)
    out = {}
    for task, path in zip(tasks, config.models, strict=False):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        out[task] = {k: float(v) for k, v in evaluate(objectives, model, tok).items() if k in tasks}
    return out


def check_ratio(config: Any, rank: int, expected: float) -> float:
    """The extra ratio of one twin candidate built for real (``extra_param_ratio``), to check ``expected``."""
    from mergesearch.candidates import candidate_from
    from mergesearch.execution.worker import MergeWorker
    from mergesearch.spaces import build_space, num_layers_of
    worker = MergeWorker(config)
    space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                        num_layers=num_layers_of(config.base_model), dtype=config.dtype,
                        objectives=[o.label for o in config.objectives if o.data is not None])
    spec = space.candidate({**space.presets()["uniform"], "twin.rank": rank})
    candidate = candidate_from(spec)
    model = candidate.build(worker.context)
    def numel(m: Any) -> int:
        return sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())

    try:  # the extra_params objective's definition: parameters and buffers beyond the shared model
        got = (numel(model) - numel(model.shared)) / sum(p.numel() for p in model.shared.parameters())
    finally:
        candidate.release(model)
    if abs(got - expected) > 1e-12:
        raise SystemExit(f"extra ratio of a built rank-{rank} twin is {got}, the formula says {expected}")
    return got


def exclusive_energy(config: Any, weights: Mapping[str, Sequence[float]], ranks: Sequence[int] = (1, 2, 4)
                     ) -> dict[str, dict[str, dict[str, float]]]:
    """How low-rank each expert's exclusive part is: per shared merge (task arithmetic with the given per-model
    weights) and expert, the share of Σ‖θt − θ*‖²_F over the factored weights that the best rank-r parts keep
    (Σ of the r largest squared singular values / Σ of all), for each r in ``ranks``."""
    import torch

    from mergesearch.execution.worker import MergeWorker
    from mergesearch.spaces import build_space, num_layers_of
    from mergesearch.twin.factors import target_weights

    worker = MergeWorker(config)
    merger = worker.merger
    space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                        num_layers=num_layers_of(config.base_model), dtype=config.dtype,
                        objectives=[o.label for o in config.objectives if o.data is not None])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for label, w in weights.items():
        merger.apply(space.decode({**space.presets()["uniform"], **{f"weight.{i}": x for i, x in enumerate(w)}}))
        names = list(target_weights(merger.model, merger.tensor_names))
        out[label] = {}
        for expert, task in zip(merger.models, [o.label for o in config.objectives if o.data is not None],
                                strict=False):
            total, kept = 0.0, dict.fromkeys(ranks, 0.0)
            with torch.no_grad():
                for n in names:
                    d = (merger.base_state[n].float() + merger.delta(expert, n).float()
                         - merger.model.get_parameter(n).detach().float())
                    sq2 = torch.linalg.svdvals(d) ** 2
                    total += float(sq2.sum())
                    for r in ranks:
                        kept[r] += float(sq2[:r].sum())
            out[label][task] = {str(r): kept[r] / total for r in ranks}
    return out


def run_search(config: Any, variant: str, seed: int) -> Any:
    """One search on an in-memory study with one resident local worker; returns the SearchRun."""
    from mergesearch.execution.local import LocalExecutor
    from mergesearch.execution.worker import MergeWorker
    from mergesearch.search.loop import SearchRun

    worker = MergeWorker(config)
    run = SearchRun(config, storage="memory://", study_name=f"{variant}-s{seed}", trials=config.search.trials,
                    seed=seed)
    run.run(LocalExecutor(lambda: worker))
    return run


def study_points(run: Any, extra_of: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """The stored front and every completed trial (number, values, rank, stored and exact extra ratio)."""
    import optuna

    from mergesearch.search.pareto import load_front

    front = load_front(run.study)
    rows = []
    for t in sorted(run.study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        rank = (t.user_attrs.get("candidate") or {}).get("rank")
        values = dict(zip([n for n, _ in run.objectives], map(float, t.values), strict=True))
        rows.append({"number": t.number, "values": values, "rank": rank, "summary": t.user_attrs.get("summary", ""),
                     "origin": "refine" if "refine_of" in t.user_attrs else
                     "recipe" if t.user_attrs.get("initial") else "",
                     "stored_extra": values.get("extra_params", 0.0),
                     "extra": 0.0 if rank is None else extra_of(int(rank)),
                     "timings": t.user_attrs.get("timings", {})})
    return front, rows


def corrected_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[tuple[str, str]]) -> list[int]:
    """Trial numbers of the non-dominated rows when ``extra_params`` takes the exact ratio."""
    import numpy as np

    from mergesearch.search.pareto import non_dominated

    names = [n for n, _ in objectives]
    arr = np.array([[r["extra"] if n == "extra_params" else r["values"][n] for n in names] for r in rows])
    return [rows[i]["number"] for i in non_dominated(arr, [d for _, d in objectives])]


def rescore(run: Any, front: Any, numbers: Sequence[int]) -> dict[int, dict[str, float]]:
    """Test-split values of the given trials (``validate_front`` on a front holding just them)."""
    from mergesearch.exporting import validate_front
    from mergesearch.search.pareto import FrontTrial

    by_number = {t.number: t for t in front.trials}
    trials = [by_number.get(n) or FrontTrial(number=n, values={}) for n in numbers]
    checked = validate_front(run.study, None, replace(front, trials=trials))
    return {t.number: {k: float(v) for k, v in t.test_values.items()} for t in checked.trials}


def front_report(points: list[dict[str, Any]]) -> dict[str, Any]:
    """Best weakest-task point overall, under the extra-parameter cap, and per twin rank (``best_by_rank``:
    rank -> [weakest, extra, trial] of the best point of that rank)."""
    best, capped = best_point(points), best_point(points, EXTRA_CAP)
    by_rank: dict[str, list[Any]] = {}
    for rank in sorted({p["rank"] for p in points if p.get("rank") is not None}):
        top = best_point([p for p in points if p.get("rank") == rank])
        by_rank[str(rank)] = [top["weakest"], top["extra"], top["trial"]]
    return {"points": points, "best": best, "best_under_cap": capped, "best_by_rank": by_rank,
            "meets_target": bool(capped is not None and capped["weakest"] >= TARGET_RATIO)}


def warm_start(run: Mapping[str, Any], search_experts: Mapping[str, float]) -> dict[str, float]:
    """The params of a static run's front point with the best weakest task on the SEARCH split (each task's
    search accuracy over its expert's search accuracy): the twin search's extra initial point."""
    rows = run["front_params"]
    best = max(rows, key=lambda r: weakest(normalised(r["search"], search_experts)))
    return dict(best["params"])


def one_run(args: argparse.Namespace, variant: str, seed: int, tasks: list[str], experts: dict[str, float],
            budget_info: dict[str, Any], warm: Mapping[str, float] | None = None) -> dict[str, Any]:
    budget = args.distill_budget if (VARIANTS[variant] or {}).get("distill") is not None else args.budget
    config = job_config(args.demo_dir, variant, seed, budget, warm, args.fit_prompts)
    width = router_width(variant) or 64
    static = budget_info["static_params"]
    router = router_extra(budget_info["hidden"], width, len(tasks))

    def extra_of(rank: int) -> float:
        return true_extra_ratio(rank, budget_info["factor_params_per_rank"], router, static)

    start = time.perf_counter()
    run = run_search(config, variant, seed)
    elapsed = time.perf_counter() - start
    front, rows = study_points(run, extra_of)
    stored = [t.number for t in front.trials]
    objective_ok = all(abs(r["stored_extra"] - r["extra"]) < 1e-9 for r in rows)
    fronts = {"stored": stored}
    if VARIANTS[variant] is not None and not objective_ok:
        fronts["corrected"] = corrected_front(rows, run.objectives)
    numbers = sorted({n for f in fronts.values() for n in f})
    test = rescore(run, front, numbers)
    by_number = {r["number"]: r for r in rows}
    out: dict[str, Any] = {"variant": variant, "seed": seed, "elapsed": elapsed, "trials": len(rows),
                           "budget": budget, "warm_start": dict(warm) if warm else None,
                           "router_width": width if VARIANTS[variant] is not None else None,
                           "extra_params_objective_ok": objective_ok,
                           "timing": timing_summary([r["timings"] for r in rows]),
                           "ranks_tried": sorted({r["rank"] for r in rows if r["rank"] is not None}),
                           "front_params": [{"trial": t.number, "params": dict(t.params),
                                             "search": by_number[t.number]["values"]} for t in front.trials]}
    for kind, members in fronts.items():
        points = []
        for n in members:
            r = by_number[n]
            ratios = normalised(test[n], experts)
            points.append({"trial": n, "summary": r["summary"], "origin": r["origin"], "rank": r["rank"],
                           "extra": r["extra"], "stored_extra": r["stored_extra"], "search": r["values"],
                           "test": test[n], "normalised": ratios, "weakest": weakest(ratios)})
        out[kind] = front_report(points)
    return out


def budget(config: Any, tasks: list[str]) -> dict[str, Any]:
    """The exact parameter arithmetic of the twin family on the demo model."""
    from transformers import AutoConfig

    from mergesearch.models import Checkpoint

    shapes = Checkpoint(config.base_model).shapes
    hidden = int(AutoConfig.from_pretrained(str(config.base_model)).hidden_size)
    static = sum(math.prod(int(d) for d in s) for s in shapes.values())
    per_rank = factor_params_per_rank(shapes, len(tasks))
    out: dict[str, Any] = {"static_params": static, "hidden": hidden, "experts": len(tasks),
                           "factor_params_per_rank": per_rank, "rank1_factors_ratio": per_rank / static}
    for width in (64, 16):
        r = router_extra(hidden, width, len(tasks))
        out[f"router_w{width}"] = {"params": router_params(hidden, width, len(tasks)), "buffers": 2 * hidden,
                                   "ratio": r / static,
                                   "extra_ratio_by_rank": {k: true_extra_ratio(k, per_rank, r, static)
                                                           for k in range(1, MAX_RANK + 1)},
                                   "max_rank_under_cap": max_rank_under(EXTRA_CAP, per_rank, r, static)}
    return out


# ------------------------------------------------------------------------------------------------ table

def fmt_point(p: Mapping[str, Any] | None) -> str:
    if p is None:
        return "none"
    tasks = " ".join(f"{k}={v:.3f}" for k, v in p["normalised"].items())
    rank = f" r={p['rank']}" if p["rank"] is not None else ""
    return f"{p['weakest']:.3f} (#{p['trial']}{rank}, extra {100 * p['extra']:.2f} %; {tasks})"


def by_rank(router: Mapping[str, Any], rank: int) -> float:
    """The extra ratio at ``rank`` from a budget entry (keys are ints in memory, strings after JSON)."""
    ratios = router["extra_ratio_by_rank"]
    return float(ratios[rank] if rank in ratios else ratios[str(rank)])


def table(record: dict[str, Any]) -> str:
    lines = [f"experts' own test accuracy: {record['expert_own_accuracy']}",
             f"load average at start {record['load_average_at_start']}, at end {record.get('load_average_at_end')}",
             "variant   seed front      best weakest-task normalised (point)                              "
             "best with extra <= 10 %   s/trial merge+eval"]
    for r in record["runs"]:
        tm = r["timing"]
        for kind in ("stored", "corrected"):
            if kind not in r:
                continue
            capped = r[kind]["best_under_cap"]
            lines.append(f"{r['variant']:<9} {r['seed']:>4} {kind:<10} {fmt_point(r[kind]['best']):<66}"
                         f"{'none' if capped is None else format(capped['weakest'], '.3f'):>10} "
                         f"{tm.get('total', float('nan')):>10.3f} ({tm.get('merge', 0):.3f}+{tm.get('eval', 0):.3f})")
            if r[kind].get("best_by_rank"):
                lines.append("               best weakest by rank: " + ", ".join(
                    f"r={k}: {w:.3f} at {100 * e:.2f} % (#{n})" for k, (w, e, n) in r[kind]["best_by_rank"].items()))
    b = record["budget"]
    lines.append(f"rank-1 factors alone: {b['factor_params_per_rank']} / {b['static_params']} = "
                 f"{100 * b['rank1_factors_ratio']:.2f} % of the model; router width 64: "
                 f"{100 * b['router_w64']['ratio']:.2f} % (rank 1 total "
                 f"{100 * by_rank(b['router_w64'], 1):.2f} %), "
                 f"width 16: {100 * b['router_w16']['ratio']:.2f} % (rank 1 total "
                 f"{100 * by_rank(b['router_w16'], 1):.2f} %)")
    c = record["cost"]
    lines.append("evaluation cost, mean s/trial (merge + eval): " + ", ".join(
        f"{v} {m['total']:.3f} ({m['merge']:.3f} + {m['eval']:.3f})"
        + ("" if v == "static" else f" x{m['total'] / c['static']['total']:.1f}")
        for v, m in c.items() if isinstance(m, dict)))
    if record.get("exclusive_energy"):
        lines.append("share of ||θt − θ*||² kept at rank r (shared = task arithmetic): " + "; ".join(
            f"{label}: " + ", ".join(f"{t} " + "/".join(f"r{r} {v:.2f}" for r, v in e.items()) for t, e in by.items())
            for label, by in record["exclusive_energy"].items()))
    lines.append(f"target (a twin front point >= {TARGET_RATIO} of every expert at <= 10 % extra): "
                 f"{'MET' if record['target_met'] else 'MISSED'} — {record['verdict']}")
    return "\n".join(lines)


def verdict(runs: list[dict[str, Any]]) -> tuple[bool, str]:
    """(met, text): met when some twin run's front holds a target point; the text lists every twin run (met or
    not, with its best point under the cap), so a result that holds for some seeds only says so."""
    twin = [r for r in runs if r["variant"] != "static"]
    kinds = [(r, k) for r in twin for k in ("stored", "corrected") if k in r]
    parts = []
    for r, k in kinds:
        capped, best = r[k]["best_under_cap"], r[k]["best"]
        parts.append(f"{r['variant']} s{r['seed']} {k}: {'MET' if r[k]['meets_target'] else 'missed'}, best under "
                     f"the cap {'none (no point <= 10 %)' if capped is None else format(capped['weakest'], '.3f')}"
                     + ("" if capped is None else f" at {100 * capped['extra']:.2f} %")
                     + f", best overall {best['weakest']:.3f} at {100 * best['extra']:.1f} %")
    met = [(r, k) for r, k in kinds if r[k]["meets_target"]]
    by_variant: dict[str, list[int]] = {}
    for r, _ in met:
        by_variant.setdefault(r["variant"], []).append(r["seed"])
    seeds = {v: sorted({r["seed"] for r, _ in kinds if r["variant"] == v}) for v in {r["variant"] for r, _ in kinds}}
    head = "; ".join(f"{v}: met in {len(set(s))} of {len(seeds[v])} seeds" for v, s in sorted(by_variant.items()))
    return bool(met), (head + " — " if head else "") + "; ".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import optuna
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--budget", type=int, default=40, help="trials of the static and SVD-twin searches")
    p.add_argument("--distill-budget", type=int, default=6, help="trials of the distilled-twin searches")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--demo-dir", type=Path, default=sq.DEMO_DIR)
    p.add_argument("--out", type=Path, default=sq.RESULTS)
    p.add_argument("--fit-prompts", type=int, default=FIT_PROMPTS,
                   help="fit prompts per task of the variants with fit_data (twin_distill_fit)")
    p.add_argument("--name", default="twin_merging",
                   help="result file stem: OUT/NAME.json and OUT/NAME.png (a run with another configuration "
                        "takes another name, so earlier results are kept)")
    p.add_argument("--recompute", action="store_true",
                   help="re-derive the extra ratios, selections, verdict and table of OUT/NAME.json from its "
                        "stored ranks and test scores (no search, no model)")
    args = p.parse_args(argv)
    path = args.out / f"{args.name}.json"
    if args.recompute:
        record = recompute(json.loads(path.read_text()))
        config = job_config(args.demo_dir, "twin_w16", 0, args.budget)
        record["budget"]["checked_rank1_w16"] = check_ratio(config, 1, by_rank(record["budget"]["router_w16"], 1))
        if "exclusive_energy" not in record:
            record["exclusive_energy"] = exclusive_energy(config, ENERGY_MERGES)
            finish(record)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(record["table"])
        return record
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    load_start = os.getloadavg()
    t0 = time.perf_counter()

    # the SVD twin at rank 1 has the distilled one's exact shapes (distillation changes values, not sizes)
    config = job_config(args.demo_dir, "twin_w16", 0, args.budget)
    tasks = [o.label for o in config.objectives if o.data is not None]
    scores = expert_accuracy(config, tasks)
    experts = {t: scores[t][t] for t in tasks}
    search_scores = expert_accuracy(config, tasks, "search")
    search_experts = {t: search_scores[t][t] for t in tasks}
    info = budget(config, tasks)
    info["checked_rank1_w16"] = check_ratio(config, 1, by_rank(info["router_w16"], 1))
    print(f"experts' own test accuracy {experts}, search {search_experts}; rank-1 extra ratio (router width 16) "
          f"{info['checked_rank1_w16']:.4f}", file=sys.stderr)
    energy = exclusive_energy(config, ENERGY_MERGES)

    record: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "demo": {"dir": str(args.demo_dir), "variant": "FULL (mergesearch demo's models)"},
        "config": {"seeds": seeds, "budget": args.budget, "distill_budget": args.distill_budget,
                   "variants": {v: VARIANTS[v] for v in variants}, "max_rank": MAX_RANK,
                   "optimizer": config.search.optimizer, "initial": [str(x) for x in config.search.initial],
                   "warm_start": "twin searches also start from the same seed's static best (search split)",
                   "fit_data": fit_record(args.demo_dir, config.objectives, variants, args.fit_prompts),
                   "refine": "budget // 4",
                   "space": sq.space_config("weights").model_dump(mode="json", by_alias=True),
                   "objectives": [o.model_dump(mode="json") for o in config.objectives],
                   "target": {"weakest_normalised": TARGET_RATIO, "extra_cap": EXTRA_CAP}},
        "seeds": seeds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "load_average_at_start": [round(x, 2) for x in load_start],
        "expert_test_scores": scores, "expert_own_accuracy": experts, "expert_search_scores": search_scores,
        "budget": info, "exclusive_energy": energy,
        "runs": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed-major: a twin search starts from the same seed's static best
        warm = None
        for variant in variants:
            r = one_run(args, variant, seed, tasks, experts, info, None if variant == "static" else warm)
            if variant == "static":
                warm = warm_start(r, search_experts)
            record["runs"].append(r)
            print(f"[{time.perf_counter() - t0:6.0f} s] {variant} seed {seed}: {r['trials']} trials in "
                  f"{r['elapsed']:.0f} s, best {fmt_point(r['stored']['best'])}", file=sys.stderr, flush=True)
            path.write_text(json.dumps(record, indent=1) + "\n")

    record["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    record["elapsed"] = time.perf_counter() - t0
    finish(record)
    if "table" in record:
        print(record["table"])
    path.write_text(json.dumps(record, indent=1) + "\n")
    previous = args.out / "twin_merging_svd.json"
    plot(record, json.loads(previous.read_text()) if previous.is_file() else None, args.out / f"{args.name}.png")
    return record


def plot(record: Mapping[str, Any], previous: Mapping[str, Any] | None, path: Path) -> None:
    """Every front point on the test split: weakest task (normalised) against extra parameters, per variant, with
    the target region; ``previous``: an older record (the SVD-only twins) drawn faintly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.fill_between([0, 100 * EXTRA_CAP], TARGET_RATIO, 1.02, color="tab:green", alpha=0.12,
                    label=f"target: >= {TARGET_RATIO} at <= {100 * EXTRA_CAP:.0f} % extra")
    styles = {"static": ("tab:gray", "s"), "twin": ("tab:blue", "o"), "twin_w16": ("tab:cyan", "o"),
              "twin_distill": ("tab:red", "D"), "twin_distill_fit": ("tab:purple", "D")}
    sources = [(previous, 0.35, " (previous run)", {"static"})] if previous else []
    sources.append((record, 1.0, "", set()))
    for rec, alpha, suffix, skip in sources:
        for variant in dict.fromkeys(r["variant"] for r in rec["runs"]):
            if variant in skip:
                continue
            pts = [q for r in rec["runs"] if r["variant"] == variant for q in r["stored"]["points"]]
            color, marker = styles.get(variant, ("black", "x"))
            ax.scatter([100 * q["extra"] for q in pts], [q["weakest"] for q in pts], color=color, marker=marker,
                       alpha=alpha, s=22, label=f"{variant}{suffix} ({len(pts)} front points)")
    ax.set_xlabel("extra parameters (% of the model)")
    ax.set_ylabel("weakest task / its expert (test split)")
    ax.set_ylim(0.3, 1.02)
    ax.set_title("Twin-Merging on the demo: front points, all seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(record: dict[str, Any]) -> None:
    """Mean evaluation cost per family, the verdict and the table (in place)."""
    def mean_cost(fam: list[dict[str, Any]]) -> dict[str, float]:
        n = sum(r["timing"]["trials"] for r in fam)
        return {k: sum(r["timing"][k] * r["timing"]["trials"] for r in fam) / n for k in ("merge", "eval", "total")}

    variants = list(dict.fromkeys(r["variant"] for r in record["runs"]))
    if "static" in variants and len(variants) > 1:
        record["cost"] = {v: mean_cost([r for r in record["runs"] if r["variant"] == v]) for v in variants}
    record["target_met"], record["verdict"] = verdict(record["runs"])
    if "cost" in record:
        record["table"] = table(record)


def recompute(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every twin point's extra ratio re-derived from its rank (:func:`true_extra_ratio`, router
    counted by :func:`router_extra`), the budget arithmetic, selections, verdict and table redone. A
    ``corrected`` front is dropped when the stored objective now agrees with the exact ratio on every front
    point (the two fronts are then the same set)."""
    b = record["budget"]
    static, per_rank, hidden, t = b["static_params"], b["factor_params_per_rank"], b["hidden"], b["experts"]
    for width in (64, 16):
        r = router_extra(hidden, width, t)
        b[f"router_w{width}"] = {"params": router_params(hidden, width, t), "buffers": 2 * hidden, "ratio": r / static,
                                 "extra_ratio_by_rank": {str(k): true_extra_ratio(k, per_rank, r, static)
                                                         for k in range(1, MAX_RANK + 1)},
                                 "max_rank_under_cap": max_rank_under(EXTRA_CAP, per_rank, r, static)}
    for run in record["runs"]:
        if run["router_width"] is None:
            continue
        router = router_extra(hidden, run["router_width"], t)
        for kind in ("stored", "corrected"):
            for p in run.get(kind, {}).get("points", []):
                p["extra"] = true_extra_ratio(int(p["rank"]), per_rank, router, static)
        points = run["stored"]["points"]
        run["extra_params_objective_ok"] = all(abs(p["stored_extra"] - p["extra"]) < 1e-9 for p in points)
        if run["extra_params_objective_ok"]:
            run.pop("corrected", None)
        for kind in ("stored", "corrected"):
            if kind in run:
                run[kind] = front_report(run[kind]["points"])
    record["recomputed"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    finish(record)
    return record


if __name__ == "__main__":
    from mergesearch.demo.check import quiet_transformers

    with quiet_transformers():  # no loading bar per model load
        main()
