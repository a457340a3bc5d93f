"""Resolve a MergePlan into one job per output tensor: inputs, method and evaluated parameters.

Follows mergekit's planner: a ``models:`` plan is one slice over every model's full layer range (the base is
appended when not listed); embeddings are planned from the first slice and the final norm / lm_head from the
last, both at t = 0; layer j of an n-layer slice is planned at t = j/(n−1) (t = 1 when n = 1). Per-input
parameters are looked up in the source's parameters, then the slice's, then the plan's; shared parameters in
the slice's, then the plan's. A setting is a scalar, a gradient (interpolated at t) or a filter list (first
entry whose filter is a substring of the tensor name; none or ``*`` matches all) — a list that matches nothing
falls through to the next level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mergesearch.errors import ConfigError
from mergesearch.merging.methods import REQUIRED, Method, Param, get_method
from mergesearch.merging.plan import ConditionalValue, InputSlice, MergePlan, OutputSlice, ParamValue
from mergesearch.models import layer_key


class ModelInfo(Protocol):
    """What resolution needs to know about a source model (a :class:`~mergesearch.models.Checkpoint` fits)."""

    shapes: dict[str, tuple[int, ...]]
    num_layers: int
    #: tensors stored in an integer or bool dtype (buffers): copied, never merged
    integer: set[str]


@dataclass(frozen=True)
class TensorJob:
    """How to compute one output tensor.

    Attributes:
        name: output tensor name.
        method: registered method name.
        inputs: (model, source tensor name) per input, in merge order.
        base_index: position of the base among ``inputs`` (None: no base).
        shared: resolved shared parameters.
        per_input: resolved per-input parameters, aligned with ``inputs``.
    """

    name: str
    method: str
    inputs: tuple[tuple[str, str], ...]
    base_index: int | None
    shared: Mapping[str, Any]
    per_input: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True)
class Resolved:
    """A plan resolved against its models: the jobs and the output layer map."""

    jobs: list[TensorJob]
    #: output layer i comes from (model, source layer) of its slice's first source.
    layer_map: list[tuple[str, int]]


def evaluate(value: ParamValue, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor at gradient position t (None if a filter list matches nothing)."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ConditionalValue):
        value = [value]
    if not value:
        return None
    if all(isinstance(v, ConditionalValue) for v in value):
        for cond in value:
            if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                return evaluate(cond.value, tensor_name, t)
        return None
    if any(isinstance(v, bool) for v in value):
        return value[int(t * (len(value) - 1))]
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def _lookup(param: Param, scopes: Sequence[Mapping[str, ParamValue] | None], tensor: str, t: float,
            where: str) -> Any:
    for scope in scopes:
        if scope and param.name in scope:
            v = evaluate(scope[param.name], tensor, t)
            if v is not None:
                return param.check(v, where)
    if param.default is REQUIRED:
        raise ConfigError(f"missing parameter {param.name!r} for {where}")
    return param.default


def plan_slices(plan: MergePlan, models: Mapping[str, ModelInfo]) -> list[OutputSlice]:
    """The plan's slices; a ``models:`` plan becomes one slice over all layers with the base appended."""
    if (plan.models is None) == (plan.slices is None):
        raise ConfigError("a merge plan needs exactly one of 'models' or 'slices'")
    if plan.slices is not None:
        if not plan.slices:
            raise ConfigError("'slices' is empty")
        return plan.slices
    if not plan.models:
        raise ConfigError("'models' is empty")
    sources = [InputSlice(model=m.model, layer_range=(0, models[m.model].num_layers), parameters=m.parameters)
               for m in plan.models]
    if plan.base_model and plan.base_model not in [m.model for m in plan.models]:
        sources.append(InputSlice(model=plan.base_model, layer_range=(0, models[plan.base_model].num_layers)))
    return [OutputSlice(sources=sources)]


def resolve(plan: MergePlan, models: Mapping[str, ModelInfo], base: str) -> Resolved:
    """Jobs for every output tensor, in the base's tensor order (embeddings, layers, norm/head).

    Args:
        plan: the recipe.
        models: model string -> info (tensor names/shapes, layer count), for every model the plan names.
        base: the model whose tensor names and non-layer tensors define the output (the plan's base_model,
            else its first model).

    Raises:
        ConfigError: unknown method, bad or missing parameter, bad layer range, wrong number of inputs.
    """
    method = get_method(plan.merge_method)
    slices = plan_slices(plan, models)
    kinds: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    for name in models[base].shapes:
        key, layer = layer_key(name)
        if layer is None:
            (pre if "embed" in name or name.endswith(("wte.weight", "wpe.weight")) else post).append(name)
        elif key not in kinds:
            kinds.append(key)

    jobs: list[TensorJob] = []
    layer_map: list[tuple[str, int]] = []

    def slice_plan(sl: OutputSlice) -> tuple[Method, list[str], int | None]:
        """What every tensor of a slice shares, checked once: (method, input models, the base's position)."""
        srcs = sl.sources
        base_model = sl.base_model or plan.base_model
        model_names = [s.model for s in srcs]
        # a one-source slice copies its layers, whatever the plan's method
        m = get_method("passthrough") if len(srcs) == 1 else method
        base_index = model_names.index(base_model) if base_model in model_names else None
        if m.needs_base and base_index is None:
            raise ConfigError(f"merge_method {m.name!r} needs base_model among the inputs of every slice "
                              f"(base_model={base_model!r}, inputs={model_names})")
        if len(srcs) < m.min_inputs or (m.max_inputs is not None and len(srcs) > m.max_inputs):
            bound = f"{m.min_inputs}..{m.max_inputs}" if m.max_inputs else f"at least {m.min_inputs}"
            raise ConfigError(f"merge_method {m.name!r} takes {bound} models including the base, got "
                              f"{len(srcs)}: {model_names}")
        return m, model_names, base_index

    plans = [slice_plan(sl) for sl in slices]

    def add(out_name: str, in_names: Sequence[str], si: int, t: float) -> None:
        sl, (m, model_names, base_index) = slices[si], plans[si]
        src = 0 if base_index is None else base_index
        if in_names[src] in models[model_names[src]].integer:
            # position ids, masks: state, not weights (averaging ids would shift them); the base's (else the
            # first source's) are copied
            jobs.append(TensorJob(out_name, "passthrough", ((model_names[src], in_names[src]),), None, {},
                                  ({"scale": None},)))
            return
        shared = {k: _lookup(p, [sl.parameters, plan.parameters], out_name, t, f"tensor {out_name!r}")
                  for k, p in m.shared.items()}
        per_input = []
        for i, (s, in_name) in enumerate(zip(sl.sources, in_names, strict=True)):
            if m.non_base and i == base_index:
                per_input.append({})
                continue
            where = f"model {s.model!r} (tensor {in_name!r})"
            per_input.append({k: _lookup(p, [s.parameters, sl.parameters, plan.parameters], in_name, t, where)
                              for k, p in m.per_input.items()})
        jobs.append(TensorJob(out_name, m.name, tuple(zip(model_names, in_names, strict=True)), base_index, shared,
                              tuple(per_input)))

    for name in pre:
        add(name, [name] * len(slices[0].sources), 0, 0.0)
    out_layer = 0
    for si, sl in enumerate(slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if len(lengths) != 1:
            raise ConfigError(f"slice {si}: all sources must span the same number of layers, got "
                              f"{[list(s.layer_range) for s in sl.sources]}")
        for s in sl.sources:
            n_layers = models[s.model].num_layers
            lo, hi = s.layer_range
            if not 0 <= lo < hi <= n_layers:
                raise ConfigError(f"slice {si}: layer_range [{lo}, {hi}] of model {s.model!r} is outside its "
                                  f"{n_layers} layers (half-open range within [0, {n_layers}])")
        n = lengths.pop()
        for j in range(n):
            t = j / (n - 1) if n > 1 else 1.0
            for key in kinds:
                add(key.format(out_layer), [key.format(s.layer_range[0] + j) for s in sl.sources], si, t)
            layer_map.append((sl.sources[0].model, sl.sources[0].layer_range[0] + j))
            out_layer += 1
    for name in post:
        add(name, [name] * len(slices[-1].sources), len(slices) - 1, 0.0)
    return Resolved(jobs, layer_map)


def plan_models(plan: MergePlan) -> list[str]:
    """Every model string the plan names, base first, without duplicates."""
    names: list[str] = [plan.base_model] if plan.base_model else []
    for m in plan.models or []:
        names.append(m.model)
    for sl in plan.slices or []:
        names.extend(s.model for s in sl.sources)
        if sl.base_model:
            names.append(sl.base_model)
    return list(dict.fromkeys(names))
