"""The objective types by name, config validation, building objectives once and evaluating them together.

A new objective type is one module with an :class:`~mergesearch.objectives.base.ObjectiveBase` subclass plus
one line in :data:`OBJECTIVES`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from mergesearch.errors import ConfigError, TrialError
from mergesearch.objectives.base import Objective, ObjectiveBase, ObjectiveContext
from mergesearch.objectives.choice import Choice
from mergesearch.objectives.cost import ExtraParams, L1FromBase, Latency, LayerCount, NonzeroDelta, ParamCount
from mergesearch.objectives.exact_match import ExactMatch
from mergesearch.objectives.lmeval import LmEval
from mergesearch.objectives.loglik import LogLik
from mergesearch.objectives.perplexity import Perplexity
from mergesearch.objectives.python import PythonObjective

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig
    from mergesearch.search.fidelity import Rungs

OBJECTIVES: dict[str, type[ObjectiveBase]] = {
    "exact_match": ExactMatch,
    "loglik": LogLik,
    "choice": Choice,
    "perplexity": Perplexity,
    "python": PythonObjective,
    "lm_eval": LmEval,
    "l1_from_base": L1FromBase,
    "nonzero_delta": NonzeroDelta,
    "params": ParamCount,
    "layers": LayerCount,
    "latency": Latency,
    "extra_params": ExtraParams,
}


def objective_class(config: ObjectiveConfig) -> type[ObjectiveBase]:
    """The class of ``config.type``; an unknown type lists the known ones with a 'did you mean'."""
    cls = OBJECTIVES.get(config.type)
    if cls is None:
        close = difflib.get_close_matches(config.type, list(OBJECTIVES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            f"objective '{config.label}': unknown type '{config.type}'{hint}; known: {', '.join(OBJECTIVES)}"
        )
    return cls


def validate_objective(config: ObjectiveConfig) -> None:
    """Check an objective's type and type-specific keys without reading data or models.

    Raises:
        ConfigError: one line naming the objective and the offending key.
    """
    cls = objective_class(config)
    try:
        cls.Params.model_validate(config.options)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<options>"
        if first["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(cls.Params.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(cls.Params.model_fields) or "none"
            raise ConfigError(
                f"objective '{config.label}': unknown key '{key}' for type '{config.type}'{hint}; "
                f"its keys: {known}"
            ) from None
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"objective '{config.label}': {key}: {msg}") from None
    if cls.needs_data and config.data is None:
        raise ConfigError(f"objective '{config.label}': type '{config.type}' needs a 'data' file")


def build_objectives(configs: Sequence[ObjectiveConfig], context: ObjectiveContext) -> list[Objective]:
    """Validate the configs and build their objectives, reading data files once.

    Raises:
        ConfigError: invalid options. DataError: missing, malformed or empty data files.
    """
    for c in configs:
        validate_objective(c)
    return [objective_class(c)(c, context) for c in configs]


@dataclass
class Evaluation:
    """What scoring one model produced.

    Attributes:
        values: ``{objective name: value}`` at full fidelity; None when a lower rung stopped the trial.
        rungs: ``{objective name: value}`` at each lower rung reached, in order.
        examples: examples scored, summed over objectives and rungs (objectives without examples count 0).
        per_example: see the field.
    """

    values: dict[str, float] | None
    rungs: list[dict[str, float]] = field(default_factory=list)
    examples: int = 0
    #: with a fidelity estimator: each example's value, in order, for objectives whose score is their mean
    per_example: dict[str, list[float]] = field(default_factory=dict)


def _finite(o: Objective, value: Any) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise TrialError(f"objective '{o.name}' returned {value}")
    return value


def evaluate_staged(objectives: Sequence[Objective], model: Any, tokenizer: Any,
                    rungs: Rungs | None = None) -> Evaluation:
    """Score ``model`` on every objective, in the stages of ``rungs`` (None: one full-fidelity stage).

    Each stage scores only the examples it adds to the previous one (prefixes of each objective's seeded
    subset); an objective without examples (a cost) is scored once, at the first stage. After each lower rung,
    ``rungs.promoted`` decides whether the next stage runs.

    Raises:
        TrialError: an objective returned a non-finite value at some stage (the message names it).
    """
    model.eval()  # scoring never wants dropout
    sizes = list(rungs.sizes) if rungs is not None else []
    records: dict[str, list[dict[str, Any]]] = {o.name: [] for o in objectives}
    fixed: dict[str, float] = {}
    out = Evaluation(values=None)
    for k in range(len(sizes) + 1):
        values = {}
        for o in objectives:
            n = o.size() if isinstance(o, ObjectiveBase) else 0
            if n == 0:
                if o.name not in fixed:
                    fixed[o.name] = _finite(o, o(model, tokenizer))
                values[o.name] = fixed[o.name]
                continue
            want, done = (n if k == len(sizes) else min(sizes[k], n)), len(records[o.name])
            if want > done:
                records[o.name] += o.score(model, tokenizer, done, want)
                out.examples += want - done
            values[o.name] = _finite(o, o.reduce(records[o.name][:want]))
        if rungs is not None and rungs.estimator != "none":  # what the estimator needs, kept with the trial
            out.per_example = {o.name: [float(r["value"]) for r in records[o.name]] for o in objectives
                               if records[o.name] and type(o).reduce is ObjectiveBase.reduce}
        if k == len(sizes):
            out.values = values
            for o in objectives:
                if records[o.name]:
                    o.last_details = records[o.name]
            return out
        out.rungs.append(values)
        if rungs is not None and not rungs.promoted(k, values, out.per_example):
            return out
    return out


def evaluate(objectives: Sequence[Objective], model: Any, tokenizer: Any) -> dict[str, float]:
    """Score ``model`` on every objective at full fidelity: ``{objective name: value}``.

    Raises:
        TrialError: an objective returned a non-finite value (the message names it).
    """
    values = evaluate_staged(objectives, model, tokenizer).values
    return values if values is not None else {}
