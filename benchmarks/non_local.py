"""Non-local merging on the non-local demo (issue 17, item 4): does alignment (and correction) undo the collapse?

The demo (:mod:`mergesearch.demo.non_local`): the ordinary demo's three experts (reverse, swap, sort), each with
its decoder layers' MLP units and attention head groups randomly permuted — the same functions, far from the base
in weight space. All accuracies are exact match on the held-out **test** split (512 examples per task).

Rows (fixed before running):

- ``experts``: each permuted expert on its own task (equal to the unpermuted expert: permuting preserves function).
- ``naive uniform average``: task arithmetic with weights 1/3 on the permuted experts, no alignment.
- ``uniform average, aligned (weights|activations)``: the same after ``space.align`` weight / activation matching.
- ``best static front point``: a search without alignment (``space.align: [none]``).
- ``best aligned``: the same search with ``space.align: [weights]``.
- ``best aligned + corrected``: the same with ``space.correct: [variance]`` added (``--correct``; measured only if
  the job config accepts the key, otherwise reported as not measured).

Search configuration, decided before any run: the demo's job (``non_local.yaml``) with its space (task arithmetic,
one weight per model in [0, 1], granularity global) and its search section (``tpe``, 40 trials, initial points
``uniform`` and every weight 0.5, ``refine: 10``), objectives reverse/swap/sort exact match on the 128-example
search split plus ``l1`` from the base; one resident local worker; seeds 0, 1, 2 (``--seeds``; ``search.seed``).

"Best" point of a run, chosen on the SEARCH split only: the completed trial with the largest worst-task gap
closure, closure_t = (acc_t − naive_uniform_t) / (expert_t − naive_uniform_t) with all three terms on the search
split (ties: larger mean closure, then lower l1, then the earlier trial). It is then re-scored on the test split.

Target (issue 17): best aligned + corrected closes ≥ 50 % of the gap between the naive uniform average and the
experts on every task, test split (closure_t ≥ 0.5 for all t), in every seed. The same closure is reported for
the other rows.

Local check ("on the ordinary demo, alignment changes nothing measurable"): weight matching of each ordinary
(unpermuted) expert to the base: fraction of MLP units and head groups left in place, whether the aligned
checkpoint's tensors equal the expert's, and the test accuracy of the uniform average and TIES (d = 0.5) with and
without weight alignment. Also reported: the fraction of units where weight matching of each permuted expert
recovers the inverse of the permutation applied.

    OMP_NUM_THREADS=1 python benchmarks/non_local.py [--seeds 0,1,2] [--correct] [--demo-dir DIR] [--fast]
        [--trials 40] [--out DIR]

Writes ``benchmarks/results/non_local.json`` (``--out DIR`` elsewhere) and prints the table. Aligned experts are
cached under ``$MERGESEARCH_CACHE`` (set to a fresh temporary directory when unset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import search_quality as sq  # the shared results folder (RESULTS)

DEMO_DIR = Path("/tmp/h2demo/non_local")
TARGET = 0.5
TASKS = ("reverse", "swap", "sort")


# ------------------------------------------------------------------------------------------------ pure helpers

def closure(acc: Mapping[str, float], naive: Mapping[str, float], experts: Mapping[str, float]) -> dict[str, float]:
    """Per task, the fraction of the gap between the naive uniform average and the expert that ``acc`` closes
    (1 = as good as the expert, 0 = no better than the naive average, < 0 = worse). A task whose expert is no
    better than the naive average has no gap: NaN."""
    out = {}
    for t, e in experts.items():
        gap = float(e) - float(naive[t])
        out[t] = (float(acc[t]) - float(naive[t])) / gap if gap > 0 else float("nan")
    return out


def best_trial(rows: Sequence[Mapping[str, Any]], naive: Mapping[str, float], experts: Mapping[str, float]
               ) -> Mapping[str, Any] | None:
    """The row (``{"number", "values"}``, search-split values) with the largest worst-task closure; ties: larger
    mean closure, lower ``l1``, earlier trial."""
    def key(r: Mapping[str, Any]) -> tuple[float, float, float, int]:
        c = closure(r["values"], naive, experts)
        vals = [v for v in c.values() if v == v]
        return (min(vals), sum(vals) / len(vals), -float(r["values"].get("l1", 0.0)), -int(r["number"]))

    return max(rows, key=key) if rows else None


def target_met(c: Mapping[str, float], target: float = TARGET) -> bool:
    return all(v >= target for v in c.values() if v == v)


# ---------------------------------------------------------------------------------------------------- runs

def job(demo_dir: Path, variant: str, seed: int, trials: int) -> Any:
    """The non-local job for one variant: ``static`` (align none), ``aligned`` (align weights), ``corrected``
    (align weights + correct variance; ValueError when the config does not accept ``space.correct``)."""
    from mergesearch.config import SpaceConfig, load_config

    config = load_config(demo_dir / "non_local.yaml")
    space = config.space.model_dump(mode="json", by_alias=True, exclude_none=True)
    space["align"] = ["none"] if variant == "static" else ["weights"]
    if variant == "corrected":
        space["correct"] = ["variance"]
    try:
        checked = SpaceConfig.model_validate(space)
    except Exception as e:  # pydantic ValidationError: the key is not part of the config (yet)
        raise ValueError(f"space.correct not accepted: {str(e).splitlines()[0]}") from None
    if variant == "corrected" and list(getattr(checked, "correct", []) or []) != ["variance"]:
        raise ValueError("space.correct not accepted: SpaceConfig has no 'correct' field")
    search = config.search.model_copy(update={"seed": seed, "trials": trials,
                                              "refine": max(1, trials // 4)})
    return config.model_copy(update={"space": checked, "search": search,
                                     "execution": config.execution.model_copy(update={"executor": "local",
                                                                                      "workers": 1})})


def run_search(config: Any, name: str) -> Any:
    from mergesearch.execution.local import LocalExecutor
    from mergesearch.execution.worker import MergeWorker
    from mergesearch.search.loop import SearchRun

    worker = MergeWorker(config)
    run = SearchRun(config, storage="memory://", study_name=name, trials=config.search.trials,
                    seed=config.search.seed)
    run.run(LocalExecutor(lambda: worker))
    return run, worker


def test_scores(config: Any, worker: Any, candidate: Any) -> dict[str, float]:
    """A candidate (e.g. a stored trial's, :func:`mergesearch.candidates.stored_candidate`) built on the worker's
    resident model and scored on the test split."""
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate

    objectives = build_objectives([o for o in config.objectives if o.data is not None],
                                  ObjectiveContext(base_state=worker.merger.base_state, split="test"))
    model = candidate.build(worker.context)
    try:
        values = evaluate(objectives, model, worker.tokenizer)
    finally:
        candidate.release(model)
    return {k: round(float(v), 4) for k, v in values.items()}


def one_run(demo_dir: Path, variant: str, seed: int, trials: int, naive_search: Mapping[str, float],
            experts_search: Mapping[str, float]) -> dict[str, Any]:
    import optuna

    config = job(demo_dir, variant, seed, trials)
    start = time.perf_counter()
    run, worker = run_search(config, f"{variant}-s{seed}")
    elapsed = time.perf_counter() - start
    names = [n for n, _ in run.objectives]
    done = [t for t in run.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    rows = [{"number": t.number, "values": dict(zip(names, map(float, t.values), strict=True))} for t in done]
    best = best_trial(rows, naive_search, experts_search)
    attrs = next(t.user_attrs for t in done if t.number == best["number"])
    from mergesearch.candidates import stored_candidate

    return {"variant": variant, "seed": seed, "trials": len(done), "elapsed": elapsed,
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in run.study.get_trials(deepcopy=False)),
            "best": {"trial": best["number"], "summary": attrs.get("summary", ""), "family": attrs.get("family"),
                     "search": best["values"],
                     "test": test_scores(config, worker, stored_candidate(attrs))}}


def corrected_fixed(demo_dir: Path) -> dict[str, dict[str, float]]:
    """Test accuracy of fixed recipes (no search) of the weight-aligned experts with the variance correction: the
    correction's own effect, next to the same recipes aligned only (ValueError: ``space.correct`` not accepted)."""
    from mergesearch.candidates import candidate_from
    from mergesearch.execution.worker import MergeWorker
    from mergesearch.merging.aligned import expert_sets
    from mergesearch.spaces import build_space, num_layers_of

    config = job(demo_dir, "corrected", 0, 1)
    naive = config.model_copy(update={"space": config.space.model_copy(update={"align": ["none"]})})
    space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                        num_layers=num_layers_of(config.base_model), dtype=config.dtype, seed=0,
                        objectives=[o.label for o in config.objectives if o.data is not None],
                        aligned=expert_sets(config))
    unaligned = build_space(naive.space, base_model=config.base_model, models=list(config.models),
                            num_layers=num_layers_of(config.base_model), dtype=config.dtype, seed=0,
                            objectives=[o.label for o in config.objectives if o.data is not None])
    worker = MergeWorker(config)
    n = len(config.models)
    uniform, half = {f"weight.{i}": 1 / n for i in range(n)}, {f"weight.{i}": 0.5 for i in range(n)}
    specs = {"uniform average [aligned: weights] + corrected": space.candidate(uniform),
             "weights 0.5 [aligned: weights] + corrected": space.candidate(half),
             "uniform average (no align) + corrected": unaligned.candidate(uniform)}
    return {label: test_scores(config, worker, candidate_from(spec)) for label, spec in specs.items()}


def local_check(demo_dir: Path) -> dict[str, Any]:
    """Alignment on the ordinary demo: identity fractions, tensor equality, accuracy with and without."""
    import torch
    from safetensors.torch import load_file

    from mergesearch.config import load_config
    from mergesearch.demo.non_local import non_local_paths, recovery, score_plans
    from mergesearch.merging.aligned import ensure_aligned
    from mergesearch.merging.plan import InputModel, MergePlan

    paths = non_local_paths(demo_dir)
    config = load_config(paths["local_config"])
    rec = recovery(demo_dir)
    aligned = [str(ensure_aligned(config.base_model, m, "weights")) for m in config.models]
    same = {}
    for t, m, a in zip(TASKS, config.models, aligned, strict=True):
        x, y = load_file(str(Path(m) / "model.safetensors")), load_file(str(Path(a) / "model.safetensors"))
        same[t] = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    def plan(models: list[str], method: str, w: float, d: float | None) -> MergePlan:
        p = {"weight": w} if d is None else {"weight": w, "density": d}
        return MergePlan(merge_method=method, base_model=config.base_model, parameters={"lambda": 1.0},
                         models=[InputModel(model=m, parameters=dict(p)) for m in models], dtype=config.dtype)

    plans = {"uniform average": plan(list(config.models), "task_arithmetic", 1 / 3, None),
             "uniform average [aligned: weights]": plan(aligned, "task_arithmetic", 1 / 3, None),
             "ties d=0.5": plan(list(config.models), "ties", 1.0, 0.5),
             "ties d=0.5 [aligned: weights]": plan(aligned, "ties", 1.0, 0.5)}
    acc = score_plans(config, plans, split="test", extra_models=aligned)
    diff = {label: {t: round(acc[f"{label} [aligned: weights]"][t] - acc[label][t], 4) for t in TASKS}
            for label in ("uniform average", "ties d=0.5")}
    return {"identity_fraction": {t: rec[t]["local_identity"] for t in TASKS},
            "aligned_tensors_equal_expert": same, "accuracy": acc, "accuracy_difference_aligned_minus_not": diff,
            "permuted_recovered_fraction": {t: rec[t]["permuted_recovered"] for t in TASKS},
            "permuted_recovered_exactly": {t: rec[t]["permuted_exact"] for t in TASKS}}


# ---------------------------------------------------------------------------------------------------- output

def table(record: Mapping[str, Any]) -> str:
    lines = ["non-local demo, test split (512/task): accuracy reverse / swap / sort, gap closure in brackets",
             f"{'row':<44}{'reverse':>16}{'swap':>16}{'sort':>16}  target"]

    def row(label: str, acc: Mapping[str, float] | None, c: Mapping[str, float] | None = None,
            verdict: str = "") -> None:
        if acc is None:
            lines.append(f"{label:<44}{'not measured':>16}")
            return
        cells = [f"{acc[t]:.3f}" + (f" ({c[t]:+.2f})" if c else "") for t in TASKS]
        lines.append(f"{label:<44}" + "".join(f"{x:>16}" for x in cells) + (f"  {verdict}" if verdict else ""))

    row("experts (own task)", record["experts"])
    row("base", record["accuracy"]["base"])
    for label, acc in record["merges"].items():
        row(label, acc, record["merge_closure"][label])
    for variant, label in (("static", "best static front point (no align)"), ("aligned", "best aligned (weights)"),
                           ("corrected", "best aligned + corrected")):
        runs = [r for r in record["runs"] if r["variant"] == variant]
        if not runs:
            row(label, None)
            if variant == "corrected" and record.get("corrected_not_measured"):
                lines.append(f"    ({record['corrected_not_measured']})")
            continue
        for r in runs:
            c = r["best"]["closure"]
            row(f"{label} s{r['seed']}", r["best"]["test"], c, "MET" if target_met(c) else "missed")
    lc = record["local_check"]
    lines.append("ordinary (local) demo, weight matching of each expert to the base:")
    for t in TASKS:
        f = lc["identity_fraction"][t]
        lines.append(f"  {t:<8} identity units: mlp {f['mlp']:.3f}, heads {f['attn']:.3f}; aligned tensors equal the "
                     f"expert's: {lc['aligned_tensors_equal_expert'][t]}; permuted copy recovered: mlp "
                     f"{lc['permuted_recovered_fraction'][t]['mlp']:.3f}, heads "
                     f"{lc['permuted_recovered_fraction'][t]['attn']:.3f} (exact: "
                     f"{lc['permuted_recovered_exactly'][t]})")
    for label, d in lc["accuracy_difference_aligned_minus_not"].items():
        lines.append(f"  {label}: aligned − not aligned = " + ", ".join(f"{t} {d[t]:+.4f}" for t in TASKS))
    lines.append(f"target (best aligned + corrected closes >= {TARGET:.0%} of the gap on every task): "
                 f"{record['target']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--correct", action="store_true", help="also run the aligned search with space.correct: [variance]")
    p.add_argument("--demo-dir", type=Path, default=DEMO_DIR)
    p.add_argument("--demo-seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="the fast demo variant (tests)")
    p.add_argument("--out", type=Path, default=sq.RESULTS)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import optuna
    import torch

    from mergesearch.demo.non_local import build_non_local, merge_table

    args = parse_args(argv)
    if not os.environ.get("MERGESEARCH_CACHE"):
        os.environ["MERGESEARCH_CACHE"] = tempfile.mkdtemp(prefix="mergesearch-nonlocal-")
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    built = build_non_local(args.demo_dir, seed=args.demo_seed, fast=args.fast,
                            progress=lambda m: print(m, file=sys.stderr))
    acc = built["accuracy"]
    experts = {t: acc[f"expert {t}"][t] for t in TASKS}
    merges = {k: v for k, v in acc.items() if k in ("uniform average", "ties d=0.5", "ties d=0.2")}
    merges.update({f"local {k}": acc[f"local {k}"] for k in ("uniform average", "ties d=0.5")})
    aligned = merge_table(args.demo_dir, modes=("weights", "activations"))
    merges.update({k: v for k, v in aligned.items() if k.startswith(("uniform average", "ties d=0.5"))})
    naive = acc["uniform average"]
    search = merge_table(args.demo_dir, modes=("none",), split="search")  # naive rows on the search split
    naive_search = search["uniform average"]
    experts_search = _experts_search(args.demo_dir)
    record: dict[str, Any] = {
        "demo": {"dir": str(args.demo_dir), "seed": args.demo_seed, "fast": args.fast,
                 "regime": "ordinary demo experts, each with its own random permutation of MLP units and head "
                           "groups in every layer"},
        "seeds": args.seeds, "trials": args.trials, "accuracy": acc, "experts": experts,
        "max_logit_change_from_permuting": built["max_logit_change"], "merges": merges,
        "merge_closure": {k: closure(v, naive, experts) for k, v in merges.items()},
        "naive_search": naive_search, "experts_search": experts_search, "runs": [],
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "load_average_at_start": load_start},
    }
    print(f"[{time.perf_counter() - t0:5.0f} s] merges measured", file=sys.stderr, flush=True)
    record["local_check"] = local_check(args.demo_dir)
    print(f"[{time.perf_counter() - t0:5.0f} s] local check done", file=sys.stderr, flush=True)
    if args.correct:
        try:
            fixed = corrected_fixed(args.demo_dir)
        except ValueError as e:
            record["corrected_not_measured"] = str(e)
        else:
            merges["weights 0.5 [aligned: weights]"] = aligned["task arithmetic λ=0.5 [aligned: weights]"]
            merges.update({k: {t: v[t] for t in TASKS} for k, v in fixed.items()})
            record["merge_closure"] = {k: closure(v, naive, experts) for k, v in merges.items()}
            print(f"[{time.perf_counter() - t0:5.0f} s] fixed corrected recipes: {fixed}", file=sys.stderr, flush=True)
    variants = ["static", "aligned"] + (["corrected"] if args.correct and "corrected_not_measured" not in record
                                        else [])
    for variant in variants:
        for seed in args.seeds:
            try:
                r = one_run(args.demo_dir, variant, seed, args.trials, naive_search, experts_search)
            except ValueError as e:
                if variant != "corrected":
                    raise
                record["corrected_not_measured"] = str(e)
                print(f"corrected: not measured ({e})", file=sys.stderr)
                break
            r["best"]["closure"] = closure(r["best"]["test"], naive, experts)
            record["runs"].append(r)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "non_local.json").write_text(json.dumps(record, indent=1) + "\n")  # partial results
            print(f"[{time.perf_counter() - t0:5.0f} s] {variant} seed {seed}: {r['trials']} trials in "
                  f"{r['elapsed']:.0f} s, best #{r['best']['trial']} {r['best']['summary']} test "
                  f"{r['best']['test']} closure {r['best']['closure']}", file=sys.stderr, flush=True)
    corrected = [r for r in record["runs"] if r["variant"] == "corrected"]
    if not corrected:
        record["target"] = "NOT MEASURED (no aligned + corrected row: " + (
            record.get("corrected_not_measured") or "run with --correct") + ")"
    else:
        met = sum(target_met(r["best"]["closure"]) for r in corrected)
        record["target"] = f"{'MET' if met == len(corrected) else 'MISSED'} in {met}/{len(corrected)} seeds"
    aligned_runs = [r for r in record["runs"] if r["variant"] == "aligned"]
    record["aligned_without_correction"] = (f"{sum(target_met(r['best']['closure']) for r in aligned_runs)}/"
                                            f"{len(aligned_runs)} seeds close >= {TARGET:.0%} on every task")
    record["elapsed"] = time.perf_counter() - t0
    record["machine"]["load_average_at_end"] = os.getloadavg()
    text = table(record)
    record["table"] = text
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "non_local.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    return record


def _experts_search(demo_dir: Path) -> dict[str, float]:
    """Each permuted expert's own-task accuracy on the search split."""
    from mergesearch.config import load_config
    from mergesearch.demo.non_local import score_plans
    from mergesearch.merging.plan import InputModel, MergePlan

    config = load_config(demo_dir / "non_local.yaml")
    plans = {t: MergePlan(merge_method="task_arithmetic", base_model=config.base_model, parameters={"lambda": 1.0},
                          models=[InputModel(model=m, parameters={"weight": 1.0 if i == j else 0.0})
                                  for j, m in enumerate(config.models)], dtype=config.dtype)
             for i, t in enumerate(TASKS)}
    acc = score_plans(config, plans, split="search")
    return {t: acc[t][t] for t in TASKS}


if __name__ == "__main__":
    main()
