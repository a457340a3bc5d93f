"""The merge methods: one table, read by the engine (resolve, run), the search space and the exporter.

Each method is declared once — its operator, its parameters (name, default, per model or shared, valid bounds,
default search range), its input contract, whether it draws random masks, and how mergekit names it. Adding a
method is one operator function (in its own module) plus one ``register(Method(...))`` line here. The table
imports no torch: operators are named as ``"module:function"`` and imported on first use, so the YAML schema
and the space can read it cheaply. Semantics: ``/work/shared/METHODS.md`` (mergekit 0.1.5).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mergesearch.errors import ConfigError

REQUIRED: Any = object()  # marks a parameter without default


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    Attributes:
        name: mergekit's name for it.
        default: value when a plan does not set it (``REQUIRED``: the plan must).
        per_input: set per input model (``weight``, ``density``) rather than once per tensor (``lambda``).
        kind: ``float``, ``int`` or ``bool``.
        bounds: closed interval every value must lie in (None: any finite number).
        search: the range searched when a space lists the method and its job gives no range for the parameter
            (None: searched only when the job gives a range). Only float parameters are searched.
    """

    name: str
    default: Any = REQUIRED
    per_input: bool = False
    kind: Literal["float", "int", "bool"] = "float"
    bounds: tuple[float, float] | None = None
    search: tuple[float, float] | None = None

    def check(self, value: Any, where: str) -> Any:
        """``value`` converted to the parameter's kind; ConfigError naming the parameter and ``where`` otherwise."""
        if self.kind == "bool":
            return bool(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"parameter {self.name!r} = {value!r} for {where} must be a finite number")
        v = int(value) if self.kind == "int" else float(value)
        if self.bounds is not None and not self.bounds[0] <= v <= self.bounds[1]:
            raise ConfigError(f"parameter {self.name!r} = {v} for {where} must be in "
                              f"[{self.bounds[0]}, {self.bounds[1]}]")
        return v


@dataclass(frozen=True)
class TaskVectorFlags:
    """Switches of the generalized task-arithmetic pipeline (METHODS.md table).

    ``rescale_variant``: ``l1`` (mergekit: kept entries scaled by ‖τ‖₁/‖mask⊙τ‖₁, for every sparsifier) or
    ``inverse_density`` (the DARE paper's 1/d).
    """

    sparsifier: Literal["magnitude", "random", "magnitude_outliers", "della_magprune"] | None
    consensus: bool
    normalize: bool
    rescale: bool
    rescale_variant: Literal["l1", "inverse_density"] = "l1"


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    Attributes:
        name: the ``merge_method`` value.
        operator: ``"module:function"`` of ``f(group, shared, per_input, **options) -> tensor``.
        params: its parameters, per model and shared.
        base: ``required`` (the base must be among the inputs: task vectors, slerp's first end, model_stock),
            ``optional`` (with a base the method works on task vectors, without it on the raw weights; a search
            passes the base) or ``unused``.
        non_base: per-input parameters apply to the non-base inputs only (the base's are ``{}``).
        min_inputs, max_inputs: how many inputs a tensor takes, base included.
        random: the result depends on the plan's ``random_seed``.
        mergekit: the name ``mergekit-yaml`` knows it by (None: mergekit cannot replay it).
        options: keyword arguments of the operator (e.g. the task-vector flags).
    """

    name: str
    operator: str
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "unused"] = "unused"
    non_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    random: bool = False
    mergekit: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_base(self) -> bool:
        """The base model must be among the inputs."""
        return self.base == "required"

    @property
    def shared(self) -> dict[str, Param]:
        """Shared parameters by name."""
        return {p.name: p for p in self.params if not p.per_input}

    @property
    def per_input(self) -> dict[str, Param]:
        """Per-input parameters by name."""
        return {p.name: p for p in self.params if p.per_input}

    def merge(self, group: Any, shared: Mapping[str, Any], per_input: Any) -> Any:
        """Run the operator on one tensor group (see :class:`mergesearch.merging.ops.TensorGroup`)."""
        return _operator(self.operator)(group, shared, per_input, **self.options)


_OPERATORS: dict[str, Callable[..., Any]] = {}


def _operator(path: str) -> Callable[..., Any]:
    fn = _OPERATORS.get(path)
    if fn is None:
        module, _, name = path.partition(":")
        fn = _OPERATORS[path] = getattr(importlib.import_module(module), name)
    return fn


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the table (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError naming the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown merge_method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def searchable_params() -> dict[str, Param]:
    """Every float parameter of any method by name (the first declaration of a name gives its search range)."""
    out: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            if p.kind == "float" and (p.name not in out or (out[p.name].search is None and p.search is not None)):
                out[p.name] = p
    return out


# ------------------------------------------------------------------------------------------------ the table

_OPS = "mergesearch.merging.ops"
WEIGHT = Param("weight", per_input=True, search=(0.0, 1.0))
DENSITY = Param("density", 1.0, per_input=True, bounds=(0.0, 1.0), search=(0.1, 1.0))
LAMBDA = Param("lambda", 1.0)


def _task_vector(name: str, flags: TaskVectorFlags, *extra: Param, mergekit: str | None = None) -> Method:
    per = (WEIGHT,) if flags.sparsifier is None else (WEIGHT, DENSITY)
    shared = (Param("int8_mask", False, kind="bool"), Param("normalize", flags.normalize, kind="bool"),
              Param("rescale", flags.rescale, kind="bool"), LAMBDA)
    return Method(name, f"{_OPS}:task_vector_merge", (*per, *extra, *shared), base="required", non_base=True,
                  random=flags.sparsifier in ("random", "della_magprune"), mergekit=mergekit or name,
                  options={"flags": flags})


register(Method("linear", f"{_OPS}:linear", (WEIGHT, Param("normalize", True, kind="bool")), mergekit="linear"))
register(Method("passthrough", f"{_OPS}:passthrough", (Param("scale", None, per_input=True),), max_inputs=1,
                mergekit="passthrough"))
register(Method("slerp", f"{_OPS}:slerp", (Param("t", bounds=(0.0, 1.0)),), base="required", min_inputs=2,
                max_inputs=2, mergekit="slerp"))
register(Method("model_stock", f"{_OPS}:model_stock", (Param("filter_wise", False, kind="bool"),), base="required",
                min_inputs=3, mergekit="model_stock"))
_GAMMA = Param("gamma", 0.01, per_input=True, bounds=(0.0, 1.0))
_DELLA_EPS = Param("epsilon", 0.15, per_input=True, bounds=(0.0, 0.5))
register(_task_vector("task_arithmetic", TaskVectorFlags(None, False, False, False)))
register(_task_vector("ties", TaskVectorFlags("magnitude", True, True, False)))
register(_task_vector("dare_linear", TaskVectorFlags("random", False, False, True)))
register(_task_vector("dare_ties", TaskVectorFlags("random", True, False, True)))
# the DARE paper's 1/d rescale; mergekit replays it as its DARE with rescale off and weights w/d (exporter)
register(_task_vector("dare_linear_invdensity", TaskVectorFlags("random", False, False, True, "inverse_density"),
                      mergekit="dare_linear"))
register(_task_vector("dare_ties_invdensity", TaskVectorFlags("random", True, False, True, "inverse_density"),
                      mergekit="dare_ties"))
register(_task_vector("breadcrumbs", TaskVectorFlags("magnitude_outliers", False, False, False), _GAMMA))
register(_task_vector("breadcrumbs_ties", TaskVectorFlags("magnitude_outliers", True, False, False), _GAMMA))
register(_task_vector("della", TaskVectorFlags("della_magprune", True, True, True), _DELLA_EPS))
register(_task_vector("della_linear", TaskVectorFlags("della_magprune", False, False, True), _DELLA_EPS))

# mergekit 0.1.5's newer methods (one module each; METHODS.md "mergekit 0.1.5's newer methods"). Parameters keep
# mergekit's names, defaults and (absence of) bounds, so its configs load unchanged.
_M = "mergesearch.merging"
_INT8_MASK = Param("int8_mask", False, kind="bool")
_RAM_EPS = Param("epsilon", 1e-5)
register(Method("sce", f"{_M}.sce:sce", (Param("select_topk", 1.0), _INT8_MASK), base="required", non_base=True,
                mergekit="sce"))
register(Method("karcher", f"{_M}.spherical:karcher", (Param("max_iter", 10, kind="int"), Param("tol", 1e-5)),
                mergekit="karcher"))
# the base is optional: with it, the two others' task vectors are slerped (resolve counts it among the inputs;
# the operator checks that exactly two others remain)
register(Method("nuslerp", f"{_M}.spherical:nuslerp", (WEIGHT, Param("nuslerp_flatten", True, kind="bool"),
                                                       Param("nuslerp_row_wise", False, kind="bool")),
                base="optional", non_base=True, min_inputs=2, max_inputs=3, mergekit="nuslerp"))
register(Method("multislerp", f"{_M}.spherical:multislerp", (WEIGHT, Param("normalize_weights", True, kind="bool"),
                                                             Param("eps", 1e-8)),
                base="optional", non_base=True, mergekit="multislerp"))
register(Method("nearswap", f"{_M}.nearswap:nearswap", (Param("t"),), base="required", min_inputs=2, max_inputs=2,
                mergekit="nearswap"))
# random: above 1M entries the quantiles come from a seeded sample
register(Method("arcee_fusion", f"{_M}.arcee_fusion:arcee_fusion", (), base="required", min_inputs=2, max_inputs=2,
                random=True, mergekit="arcee_fusion"))
register(Method("ram", f"{_M}.ram:ram", (_RAM_EPS,), base="required", non_base=True, mergekit="ram"))
register(Method("ramplus_tl", f"{_M}.ram:ramplus_tl", (Param("r", 0.1), Param("alpha", 0.2), _RAM_EPS),
                base="required", non_base=True, mergekit="ramplus_tl"))
