"""MergePlan: a merge recipe in mergekit's configuration schema.

A plan is exactly what a mergekit YAML config says (``models`` or ``slices``, ``merge_method``,
``base_model``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``), so a plan found by the search can
be written as a ``recipe.yaml`` that ``mergekit-yaml`` replays, and a user's mergekit config can be loaded as a
plan. Parameter values follow mergekit: a scalar, a gradient (a list of numbers interpolated across the layers
of a slice) or a list of ``{filter, value}`` pairs matched on tensor names (first match wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class ConditionalValue(_Frozen):
    """A parameter value applying to tensors whose name contains ``filter`` (``None`` or ``*``: all)."""

    filter: str | None = None
    value: float | bool | list[float]


#: scalar, gradient, or filtered list — mergekit's ``ParameterSetting``.
ParamValue = bool | float | list[float] | list[ConditionalValue]


class InputModel(_Frozen):
    """One source model of a ``models:`` merge, with its per-model parameters (weight, density, ...)."""

    model: str
    parameters: dict[str, ParamValue] | None = None


class InputSlice(_Frozen):
    """A contiguous half-open range of source layers ``[start, end)`` taken from one model."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamValue] | None = None


class OutputSlice(_Frozen):
    """One slice of the output network: its sources are merged layer by layer (one source: copied)."""

    sources: list[InputSlice]
    base_model: str | None = None
    parameters: dict[str, ParamValue] | None = None


class MergePlan(_Frozen):
    """A complete merge recipe (mergekit ``MergeConfiguration`` schema)."""

    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: dict[str, ParamValue] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    #: seed of the random sparsifiers (DARE, DELLA); not a mergekit key, dropped when writing for mergekit.
    random_seed: int | None = Field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain data (no ``None`` fields), e.g. for JSON in a trial's attributes."""
        return self.model_dump(mode="json", exclude_none=True)


def parse_plan(text: str, source: str = "<plan>") -> MergePlan:
    """Read a mergekit YAML config (or our recipe.yaml) into a MergePlan.

    Raises:
        ConfigError: malformed YAML (with its line) or a schema error (with the offending key).
    """
    import yaml
    from pydantic import ValidationError

    from mergesearch.errors import ConfigError

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'merge_method', got {type(data).__name__}")
    try:
        return MergePlan.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise ConfigError(f"{source}: {loc}: {err['msg']}") from None


def load_plan(path: str | Path) -> MergePlan:
    """Read a merge config file; ConfigError naming the file if it is missing or invalid."""
    from mergesearch.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"merge config {p} does not exist")
    return parse_plan(p.read_text(), str(p))


def plan_to_yaml(plan: MergePlan, *, strict_mergekit: bool = False) -> str:
    """The plan as YAML that ``parse_plan`` (and, with ``strict_mergekit``, ``mergekit-yaml``) reads back.

    Args:
        strict_mergekit: drop keys mergekit does not know (``random_seed``).
    """
    import yaml

    data = plan.to_dict()
    if strict_mergekit:
        data.pop("random_seed", None)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def mergekit_equivalent(plan: MergePlan) -> tuple[MergePlan | None, str]:
    """A plan ``mergekit-yaml`` replays with the same semantics, or (None, why not).

    Methods mergekit names differently are rewritten: the ``*_invdensity`` variants (kept DARE entries scaled by
    1/d) are mergekit's DARE with ``rescale: false`` and weights w/d — exact when weight and density are plain
    numbers and the merge does not normalise (the divisor would see w/d). Random masks are drawn by mergekit's
    own generator, so a random method replays the same distribution, not the same bits.
    """
    from mergesearch.merging.methods import get_method

    method = get_method(plan.merge_method)
    if method.mergekit is None:
        return None, f"mergekit has no method {plan.merge_method!r}"
    if method.mergekit == plan.merge_method:
        return plan, ""
    flags = method.options["flags"]
    shared = dict(plan.parameters or {})
    if not shared.get("rescale", flags.rescale):
        return plan.model_copy(update={"merge_method": method.mergekit}), ""
    if shared.get("normalize", flags.normalize):
        return None, f"{plan.merge_method} with normalize: true has no mergekit equivalent"
    density = shared.get("density")

    def rewrite(params: dict[str, ParamValue] | None, where: str) -> dict[str, ParamValue]:
        p = dict(params or {})
        w, d = p.get("weight"), p.get("density", density)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (w, d)) or d == 0:
            raise ValueError(f"{where}: weight and density are not plain numbers")
        p["weight"] = float(w) / float(d)
        return p

    shared["rescale"] = False
    try:
        if plan.models is not None:
            models = [m.model_copy(update={"parameters": rewrite(m.parameters, m.model)}) if m.model !=
                      plan.base_model else m for m in plan.models]
            return plan.model_copy(update={"merge_method": method.mergekit, "models": models,
                                           "parameters": shared}), ""
        slices = []
        for sl in plan.slices or []:
            base = sl.base_model or plan.base_model
            sources = [s.model_copy(update={"parameters": rewrite(s.parameters, s.model)}) if s.model != base
                       else s for s in sl.sources]
            slices.append(sl.model_copy(update={"sources": sources}))
        return plan.model_copy(update={"merge_method": method.mergekit, "slices": slices, "parameters": shared}), ""
    except ValueError as e:
        return None, f"{plan.merge_method}: {e}, so w/d cannot be written for mergekit"
