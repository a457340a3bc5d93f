"""Reference rows: the base model, each expert and the plain uniform average of the experts, scored by the
study's own objectives once (before the first trial) and stored with the study — so a front is always seen next
to what merging by hand gives — and the hypervolume reference point derived from them.

The rows are merges too: task arithmetic over the job's models with weights all 0 (the base), one-hot (each
expert: base + its task vector, i.e. the expert itself) and 1/N (the uniform average). They are stored as the
study user attr ``baselines`` (a list of ``{"name", "values"}``, ``values`` None when the evaluation failed,
with its ``error``), never as trials: no optimizer learns from them and ``pick`` never returns one.

Reference point (study user attr ``hv_reference``: ``{"point", "ideal", "source"}``, objective name → value):

- ``search.reference_point`` when the job gives one (``source: config``);
- else, from the rows: the base model's score for each task objective, and for each cost objective the worst
  expert's (the base's cost, 0 for ``l1_from_base``, would leave no volume to measure). Volume is then "what
  merging bought over the base, at no more cost than an expert". When the base and the experts all score the
  same on an objective (a parameter count without layer choices), the reference moves 10 % of that value
  (at least 1) to the worse side, or no trial could add volume.

``ideal``, the best value of each objective over the rows, closes the box the normalised hypervolume is
measured in: 1.0 means every task as good as its best reference row at the best row's cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

    from mergesearch.config import JobConfig
    from mergesearch.execution.base import Executor

BASELINES_ATTR = "baselines"
REFERENCE_ATTR = "hv_reference"
#: how far the reference moves past a value on which base and experts all agree (fraction of max(|v|, 1))
FLAT_MARGIN = 0.1


def baseline_plans(config: JobConfig) -> list[tuple[str, dict[str, Any]]]:
    """``(name, plan dict)`` of the reference rows: ``base``, ``expert <name>`` per model, ``uniform average``."""
    from mergesearch.exporting import model_names
    from mergesearch.merging.plan import InputModel, MergePlan

    n = len(config.models)

    def task_arithmetic(weights: Sequence[float]) -> dict[str, Any]:
        models = [InputModel(model=m, parameters={"weight": float(w)}) for m, w in zip(config.models, weights,
                                                                                       strict=True)]
        return MergePlan(merge_method="task_arithmetic", base_model=config.base_model, models=models,
                         parameters={"lambda": 1.0}, dtype=config.dtype).to_dict()

    rows = [("base", task_arithmetic([0.0] * n))]
    rows += [(f"expert {name}", task_arithmetic([1.0 if j == i else 0.0 for j in range(n)]))
             for i, name in enumerate(model_names(config.models))]
    rows.append(("uniform average", task_arithmetic([1.0 / n] * n)))
    return rows


def evaluate_rows(executor: Executor, plans: Sequence[tuple[str, dict[str, Any]]],
                  on_row: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Score each plan on the executor's workers; returns ``{"name", "values"[, "error"]}`` in plan order.

    Rows are submitted under negative ids (-1, -2, ...), which no trial has.
    """
    todo = list(enumerate(plans))
    out: dict[int, dict[str, Any]] = {}
    running = 0
    while todo or running:
        for _ in range(min(executor.idle(), len(todo))):
            i, (_name, plan) = todo.pop(0)
            executor.submit(-(i + 1), plan)
            running += 1
        for res in executor.completed(timeout=0.5):
            i = -res.trial - 1
            running -= 1
            row: dict[str, Any] = {"name": plans[i][0], "values": dict(res.values) if res.ok and res.values else None}
            if row["values"] is None:
                row["error"] = res.error or "failed"
            out[i] = row
            if on_row is not None:
                on_row(row["name"])
    return [out[i] for i in range(len(plans))]


def derive_reference(rows: Sequence[dict[str, Any]], objectives: Sequence[tuple[str, str]],
                     costs: set[str]) -> dict[str, dict[str, float]] | None:
    """``{"point", "ideal"}`` from the scored rows (see the module docstring); None when the base failed."""
    by_name = {r["name"]: r["values"] for r in rows if r.get("values")}
    base = by_name.get("base")
    experts = [v for k, v in by_name.items() if k.startswith("expert ")]
    if base is None:
        return None
    point, ideal = {}, {}
    for name, direction in objectives:
        sign = 1.0 if direction == "minimize" else -1.0  # sign * value is minimised
        column = [v[name] for v in by_name.values()]
        worst = max if sign > 0 else min
        ref = worst(e[name] for e in experts) if name in costs and experts else base[name]
        best = min(column, key=lambda x: sign * x)
        if best == ref and all(x == ref for x in column):  # flat: nothing could be strictly better
            ref += sign * FLAT_MARGIN * max(abs(ref), 1.0)
        point[name], ideal[name] = float(ref), float(best)
    return {"point": point, "ideal": ideal}


def cost_objectives(config: JobConfig) -> set[str]:
    """Names of the job's cost objectives (distance from the base, size, depth, latency)."""
    from mergesearch.objectives.cost import CostObjective
    from mergesearch.objectives.registry import objective_class

    return {o.label for o in config.objectives if issubclass(objective_class(o), CostObjective)}


def ensure_baselines(study: optuna.Study, config: JobConfig, objectives: Sequence[tuple[str, str]],
                     executor: Executor, on_row: Callable[[str], None] | None = None) -> None:
    """Score and store the reference rows (once per study) and the reference point (kept in step with
    ``search.reference_point``); a study that has them is left as it is, so every later ``front`` reads the
    same point."""
    attrs = study.user_attrs
    rows = attrs.get(BASELINES_ATTR)
    if rows is None and config.search.baselines:
        rows = evaluate_rows(executor, baseline_plans(config), on_row)
        study.set_user_attr(BASELINES_ATTR, rows)
    stored = attrs.get(REFERENCE_ATTR)
    given = config.search.reference_point
    derived = derive_reference(rows or [], objectives, cost_objectives(config))
    if given is not None:
        ref = {"point": {n: float(given[n]) for n, _ in objectives},
               "ideal": (derived or {}).get("ideal"), "source": "config"}
    elif derived is not None:
        ref = {**derived, "source": "baselines"}
    else:
        return
    if stored != ref:
        study.set_user_attr(REFERENCE_ATTR, ref)


def stored_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's scored reference rows (empty when it has none)."""
    rows = study.user_attrs.get(BASELINES_ATTR) or []
    return [r for r in rows if r.get("values")]


def stored_reference(study: optuna.Study) -> dict[str, Any] | None:
    """The study's stored ``{"point", "ideal", "source"}``, or None."""
    ref = study.user_attrs.get(REFERENCE_ATTR)
    return ref if isinstance(ref, dict) and ref.get("point") else None
