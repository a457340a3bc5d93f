"""MergeSpace: the searched parameters of a job and their decoding into a :class:`MergePlan`.

Parameters (a flat, fixed, ordered dict of Optuna distributions, so NSGA-style samplers see one space):

- ``method``: categorical over ``space.methods`` (absent when there is one method);
- ``weight.<i>[.<g>][.<filter>|.rest]`` and ``density.<i>...``: per expert ``i`` (0-based index into
  ``models``), per layer group ``g`` (omitted for ``granularity: global``), per tensor-name filter plus a
  catch-all ``rest`` (only when ``filters`` are set) — the per-model parameters with a default search range in
  the method table;
- every other float parameter a listed method reads (``lambda``, ``t``, ``epsilon``, ``select_topk``, …): one
  scalar, when its range is set (a per-model one is written at the plan level, which applies to every model);
- ``layer.<k>`` (categorical over ``layers.choices``) and ``layer_offset.<k>`` (int, when ``depth_offset > 0``)
  per output slot ``k`` (only when ``space.layers`` is set).

A trial's method reads only its own parameters (the method table, :mod:`mergesearch.merging.methods`); the
others stay in the vector, unused, and never reach the plan.

Layer groups are written as mergekit gradients whose length equals the number of layers they span: a
gradient of ``len == n`` over ``n`` layers puts layer ``j`` at ``s = j/(n-1)·(n-1) = j``, exactly on entry
``j``, so the piecewise-constant group values are reproduced exactly by mergekit and by our engine, with no new
slice boundaries (a global plan stays a ``models:`` plan that ``mergekit-yaml`` reads the same way). Constant
gradients are written as scalars. mergekit plans embeddings, the final norm and lm_head with the first gradient
entry, so those tensors take layer 0's group value (the ``rest`` value when filters are set).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mergesearch.candidates import Corrected, Static, Twin, twin_experts
from mergesearch.config import SpaceConfig, TwinSpace
from mergesearch.errors import ConfigError, ModelError
from mergesearch.merging.methods import METHODS, REQUIRED, Param, get_method
from mergesearch.merging.plan import ConditionalValue, InputModel, InputSlice, MergePlan, OutputSlice, ParamValue
from mergesearch.search import unit
from mergesearch.spaces.layers import MERGED, SKIP, LayerPlan, Token, resolve_choice, runs

#: value of a required parameter that the space does not search (mergekit has no default for these).
_FILL = {"weight": 1.0, "t": 0.5}
#: DELLA needs d - eps > 0; densities below this are raised to it.
_DELLA_MIN_DENSITY = 0.01
_SYMBOL = {"weight": "w", "density": "d", "lambda": "λ", "epsilon": "ε"}


def _neutral(p: Param) -> float:
    """The value a plan gets for ``p`` when nothing sets it: the method's default, or the fill of a required one."""
    return _FILL.get(p.name, 1.0) if p.default is REQUIRED else float(p.default)


def _fmt(v: float) -> str:
    s = f"{round(float(v), 2):g}"
    return s.replace("0.", ".", 1) if s.startswith(("0.", "-0.")) else s


def _clamp(dist: FloatDistribution, v: float) -> float:
    return float(min(dist.high, max(dist.low, v)))


def _contains(dist: BaseDistribution, v: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return v in dist.choices
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    if isinstance(dist, IntDistribution) and float(v) != int(v):
        return False
    return dist.low <= v <= dist.high  # type: ignore[attr-defined]


def _gradient(x: np.ndarray) -> float | list[float]:
    """A scalar when constant, else the per-layer list (``len(x)`` entries over ``len(x)`` layers: exact)."""
    return float(x[0]) if np.all(x == x[0]) else [float(v) for v in x]


def recipe_parameter(name: str) -> bool:
    """Whether the searched parameter ``name`` is the merge method or one of the method table's parameters
    (``method``, ``weight.<i>…``, ``density.<i>…``, ``lambda``, …): these shape the merged layers only, so a
    layer path with no ``merged`` slot decodes (:meth:`MergeSpace.decode`: a passthrough of copies) to the same
    plan whatever their values."""
    return name == "method" or name.split(".")[0] in {q.name for m in METHODS.values() for q in m.params}


class MergeSpace:
    """The search space of one job; build it with :func:`build_space`.

    Attributes:
        distributions: name -> Optuna distribution, in a fixed order.
        methods: the merge methods searched.
        layers: validated layer-choice settings, or ``None``.
    """

    def __init__(self, space: SpaceConfig, *, base_model: str, models: list[str], num_layers: int,
                 dtype: str, seed: int, objectives: Sequence[str] = (),
                 aligned: Mapping[str, Sequence[str]] | None = None) -> None:
        _check(space, models, num_layers)
        self.methods: tuple[str, ...] = tuple(space.methods)
        self.base_model, self.models, self.num_layers = base_model, list(models), num_layers
        self.dtype, self.seed = dtype, seed
        self.layers = None if space.layers is None else LayerPlan.build(space.layers, self.models, num_layers)

        g = space.granularity
        size = 1 if g == "per_layer" else num_layers if g == "global" else int(g)
        #: (L,) layer -> group index
        self._group_of = np.arange(num_layers) // size
        n_groups = int(self._group_of[-1]) + 1
        self._filters: list[str | None] = [*space.filters, None] if space.filters else [None]

        #: the float parameters of the listed methods, in table order
        self._params: dict[str, Param] = {}
        for m in self.methods:
            for q in get_method(m).params:
                if q.kind == "float":
                    self._params.setdefault(q.name, q)
        ranges = space.ranges()
        self.searched = {q for q in self._params if ranges[q] is not None}
        #: searched per model (and layer group): per-input parameters with a default search range
        per_model = [q for q in self.searched if self._params[q].per_input and self._params[q].search is not None]
        self._per_model = frozenset(per_model)

        d: dict[str, BaseDistribution] = {}
        if len(self.methods) > 1:
            d["method"] = CategoricalDistribution(list(self.methods))
        #: align choice -> the experts plans name (``none``: the job's models; see merging.aligned)
        self.align = tuple(space.align)
        self._aligned = {mode: list((aligned or {}).get(mode, ())) for mode in self.align if mode != "none"}
        for mode, paths in self._aligned.items():
            if len(paths) != len(self.models):
                raise ConfigError(f"space.align: {mode}: the aligned experts were not prepared (build the space "
                                  "with merging.aligned.expert_sets)")
        if len(self.align) > 1:
            d["align"] = CategoricalDistribution(list(self.align))
        for q in self._params:
            if q in self.searched and q not in self._per_model:
                r = ranges[q]
                d[q] = FloatDistribution(r.low, r.high, log=r.log)
        #: param -> [model][group][filter] -> distribution name
        self._names: dict[str, list[list[list[str]]]] = {}
        for p in self._params:
            if p not in self._per_model:
                continue
            r = ranges[p]
            table = []
            for i in range(len(self.models)):
                rows = []
                for gi in range(n_groups):
                    stem = f"{p}.{i}" if g == "global" else f"{p}.{i}.{gi}"
                    names = [stem if len(self._filters) == 1 else f"{stem}.{f or 'rest'}" for f in self._filters]
                    for name in names:
                        d[name] = FloatDistribution(r.low, r.high, log=r.log)
                    rows.append(names)
                table.append(rows)
            self._names[p] = table
        self.twin = space.twin
        self.correct = tuple(space.correct)
        routed = space.twin is not None or "variance" in self.correct
        #: (objective, model) pairs of a routed family (router outputs in this order)
        self.twin_experts = () if not routed else twin_experts(
            space.twin.experts if space.twin is not None else None, objectives, self.models)
        if len(self.correct) > 1:
            d["correct"] = CategoricalDistribution(list(self.correct))
        if space.twin is not None and not isinstance(space.twin.rank, int):
            d["twin.rank"] = IntDistribution(int(space.twin.rank.low), int(space.twin.rank.high))
        #: twin target label -> (modules, layers) that get factors (None: all)
        self.twin_targets: dict[str, tuple[tuple[str, ...] | None, tuple[int, ...] | None]] = {}
        if space.twin is not None:
            self.twin_targets = _twin_targets(space.twin, base_model, num_layers)
            if space.twin.fit_data is not None:  # before anything is stored: names and files, one line each
                from mergesearch.twin.data import check_fit_data

                check_fit_data(space.twin.fit_data, [o for o, _ in self.twin_experts])
            if len(self.twin_targets) > 1:
                d["twin.targets"] = CategoricalDistribution(list(self.twin_targets))
        if self.layers is not None:
            for k in range(self.layers.slots):
                d[f"layer.{k}"] = CategoricalDistribution(list(self.layers.choices))
            if self.layers.depth_offset > 0:
                for k in range(self.layers.slots):
                    d[f"layer_offset.{k}"] = IntDistribution(-self.layers.depth_offset, self.layers.depth_offset)
        if not d:
            raise ConfigError(f"space: nothing to search (methods {list(self.methods)} read no parameter whose "
                              "range is set, and space.layers is not set)")
        self.distributions: dict[str, BaseDistribution] = d

    # ------------------------------------------------------------------ params
    def complete(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check a (possibly partial) params dict and fill the missing entries.

        Missing parameters take their method default (weight 1, density 1, λ 1, t 0.5, ε 0.15, clamped into
        the range; the first method; the fill choice for layer slots; offset 0), so a hand-written
        ``search.initial`` point may name only what it cares about.

        Raises:
            ConfigError: an unknown parameter name or a value outside its distribution.
        """
        for name in params:
            if name not in self.distributions:
                raise ConfigError(f"params: unknown parameter '{name}' (space has: {', '.join(self.distributions)})")
        out: dict[str, Any] = {}
        for name, dist in self.distributions.items():
            if name in params:
                v = params[name]
                if not _contains(dist, v):
                    raise ConfigError(f"params: {name}={v!r} is outside {dist}")
                out[name] = v
            elif name == "method":
                out[name] = self.methods[0]
            elif name == "align":
                out[name] = self.align[0]
            elif name == "correct":
                out[name] = self.correct[0]
            elif name.startswith("layer."):
                out[name] = self.layers.choices[self.layers.tokens.index(self.layers.fill)]
            elif name.startswith("layer_offset."):
                out[name] = 0
            elif name == "twin.rank":
                out[name] = (dist.low + dist.high) // 2
            elif name == "twin.targets":
                out[name] = next(iter(self.twin_targets))
            else:
                out[name] = _clamp(dist, _neutral(self._params[name.split(".")[0]]))
        return out

    def neutral(self, param: str) -> float:
        """The value a plan gets for a parameter of a listed method when nothing sets it."""
        return _neutral(self._params[param])

    def sample(self, trial: Any) -> dict[str, Any]:
        """Draw every parameter from an ``optuna.Trial`` with the public ``suggest_*`` calls."""
        out: dict[str, Any] = {}
        for name, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                out[name] = trial.suggest_categorical(name, dist.choices)
            elif isinstance(dist, IntDistribution):
                out[name] = trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
            else:
                out[name] = trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        return out

    def to_unit(self, params: Mapping[str, Any]) -> np.ndarray:
        """``(d,)`` point of the unit cube for ``params`` (see :mod:`mergesearch.search.unit`)."""
        return unit.to_unit(self.complete(params), self.distributions)

    def from_unit(self, x: np.ndarray) -> dict[str, Any]:
        """Params for a ``(d,)`` point of the unit cube."""
        return unit.from_unit(x, self.distributions)

    # ------------------------------------------------------------------ decode
    def _per_layer(self, p: dict[str, Any], param: str, model: int) -> list[np.ndarray]:
        """One ``(L,)`` array per filter key (filters, then the catch-all) of a per-model parameter."""
        if param not in self._per_model:
            return [np.full(self.num_layers, _neutral(self._params[param])) for _ in self._filters]
        table = self._names[param][model]
        return [np.array([float(p[table[gi][fi]]) for gi in self._group_of]) for fi in range(len(self._filters))]

    def _render(self, arrays: list[np.ndarray], a: int, b: int) -> ParamValue:
        vals = [_gradient(x[a:b]) for x in arrays]
        if len(self._filters) == 1:
            return vals[0]
        return [ConditionalValue(filter=f, value=v) for f, v in zip(self._filters, vals, strict=True)]

    def _method_values(self, p: dict[str, Any], method: str) -> tuple[list[dict[str, list[np.ndarray]]],
                                                                    dict[str, ParamValue]]:
        """Per-expert per-layer arrays and the plan-level scalars the method reads.

        Searched parameters get their values; a required one the space does not search gets its fill value;
        the others are left out (the method's default applies).
        """
        reads = [q for q in get_method(method).params if q.kind == "float"]
        params = [q.name for q in reads if q.per_input and (q.name in self._per_model or q.default is REQUIRED)]
        per_model = [{q: self._per_layer(p, q, i) for q in params} for i in range(len(self.models))]
        shared: dict[str, ParamValue] = {}
        for q in reads:
            if q.name in self.searched and q.name not in self._per_model:
                shared[q.name] = float(p[q.name])
            elif not q.per_input and q.default is REQUIRED:
                shared[q.name] = _neutral(q)
        if method.startswith("della"):
            # DELLA keeps entries with probability in [d - eps, d + eps], which must lie inside (0, 1);
            # d = 1 means "no pruning" (mergekit returns the tensor unchanged), so it does not bound eps.
            bound = 1.0
            for arrays in per_model:
                if "density" in arrays:
                    for x in arrays["density"]:
                        np.clip(x, _DELLA_MIN_DENSITY, 1.0, out=x)
                        inner = x[x < 1.0]
                        if inner.size:
                            bound = min(bound, float(np.minimum(inner, 1.0 - inner).min()))
            shared["epsilon"] = min(float(shared.get("epsilon", _neutral(self._params["epsilon"]))), 0.99 * bound)
        return per_model, shared

    def decode(self, params: Mapping[str, Any]) -> MergePlan:
        """The merge plan for one parameter vector (deterministic; see the module docstring), naming the aligned
        experts when the params' ``align`` choice says so.

        Raises:
            ConfigError: unknown parameter names or out-of-range values.
        """
        p = self.complete(params)
        return self._align(self._plan(p), p)

    def _plan(self, p: dict[str, Any]) -> MergePlan:
        method = p.get("method", self.methods[0])
        info = get_method(method)
        per_model, shared = self._method_values(p, method)
        seed = self.seed if info.random else None
        if self.layers is None:
            models = [InputModel(model=m, parameters={q: self._render(x, 0, self.num_layers) for q, x in v.items()}
                                 or None) for m, v in zip(self.models, per_model, strict=True)]
            if method == "slerp":
                models = [InputModel(model=self.base_model), InputModel(model=self.models[0])]
            base = self.base_model if info.base != "unused" else None
            return MergePlan(merge_method=method, models=models, base_model=base, parameters=shared or None,
                             dtype=self.dtype, random_seed=seed)

        merged_any = False
        slices = []
        for token, a, b in runs(self._kept(p, method)):
            if token != MERGED:
                src = self.base_model if token == -1 else self.models[token]
                slices.append(OutputSlice(sources=[InputSlice(model=src, layer_range=(a, b))]))
                continue
            merged_any = True
            experts = [InputSlice(model=m, layer_range=(a, b),
                                  parameters={q: self._render(x, a, b) for q, x in v.items()} or None)
                       for m, v in zip(self.models, per_model, strict=True)]
            if method == "slerp":
                experts = [InputSlice(model=e.model, layer_range=(a, b)) for e in experts]
            base = [InputSlice(model=self.base_model, layer_range=(a, b))] if info.base != "unused" else []
            slices.append(OutputSlice(sources=base + experts,
                                      base_model=self.base_model if info.base != "unused" else None))
        if not merged_any:  # only copies: mergekit's passthrough reads this plan the same way
            return MergePlan(merge_method="passthrough", slices=slices, dtype=self.dtype)
        base = self.base_model if info.base != "unused" else None
        return MergePlan(merge_method=method, slices=slices, base_model=base, parameters=shared or None,
                         dtype=self.dtype, random_seed=seed)

    def _align(self, plan: MergePlan, p: Mapping[str, Any]) -> MergePlan:
        """The plan naming the aligned experts of the params' ``align`` choice (unchanged for ``none``)."""
        mode = p.get("align", self.align[0])
        if mode == "none":
            return plan
        rename = dict(zip(self.models, self._aligned[mode], strict=True))
        data = plan.to_dict()
        for m in data.get("models") or []:
            m["model"] = rename.get(m["model"], m["model"])
        for sl in data.get("slices") or []:
            for src in sl["sources"]:
                src["model"] = rename.get(src["model"], src["model"])
        return MergePlan.model_validate(data)

    def candidate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The stored spec of the candidate for ``params`` (:mod:`mergesearch.candidates`): the decoded plan,
        as a twin family when the space has ``twin``."""
        plan = self.decode(params)
        p = self.complete(params)
        if p.get("correct", self.correct[0]) == "variance":
            return Corrected(plan, self.twin_experts).spec()
        if self.twin is None:
            return Static(plan).spec()
        rank = self.twin.rank if isinstance(self.twin.rank, int) else int(p["twin.rank"])
        modules, layers = self.twin_targets[p.get("twin.targets", next(iter(self.twin_targets)))]
        distill = None if self.twin.distill is None else self.twin.distill.model_dump()
        fit = None if self.twin.fit_data is None else {k: str(v) for k, v in self.twin.fit_data.items()}
        return Twin(plan, rank, self.twin_experts, self.twin.router, modules, layers, distill, fit).spec()

    def _kept(self, p: dict[str, Any], method: str) -> list[tuple[Token, int]]:
        """``(token, source_depth)`` of each kept slot after the min/max repair, in output order."""
        lp = self.layers
        tokens = lp.repair([resolve_choice(p[f"layer.{k}"], self.models) for k in range(lp.slots)])
        out = []
        for k, t in enumerate(tokens):
            if t == SKIP:
                continue
            if method == "passthrough" and t == MERGED:
                t = -1  # passthrough merges nothing: a "merged" slot copies the base
            out.append((t, lp.depth(k, int(p.get(f"layer_offset.{k}", 0)))))
        return out

    # ------------------------------------------------------------------ presets / summary
    def recipes(self) -> dict[str, dict[str, Any]]:
        """Named recipes (presets for ``search.initial``), one per recipe whose method is searched.

        - ``uniform``: task arithmetic with weights 1/N and λ = 1 (base + mean task vector); linear with equal
          weights if task_arithmetic is not searched;
        - ``ties_default`` / ``dare_ties_default``: weight 1, density 0.5, λ = 1;
        - ``della_default``: weight 1, density 0.5, ε = 0.15; ``slerp_mid``: t = 0.5; ``model_stock``.

        Values are clamped into the space's ranges; unsearched parameters keep their neutral values and
        layer slots take the fill choice (``merged`` when allowed) with offset 0.
        """
        n = len(self.models)
        recipes: dict[str, tuple[str, dict[str, float]]] = {
            "uniform": ("task_arithmetic", {"weight": 1.0 / n, "lambda": 1.0}),
            "ties_default": ("ties", {"weight": 1.0, "density": 0.5, "lambda": 1.0}),
            "dare_ties_default": ("dare_ties", {"weight": 1.0, "density": 0.5, "lambda": 1.0}),
            "della_default": ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.15}),
            "slerp_mid": ("slerp", {"t": 0.5}),
            "model_stock": ("model_stock", {}),
        }
        if "task_arithmetic" not in self.methods:
            recipes["uniform"] = ("linear", {"weight": 1.0 / n})
        out = {}
        for name, (method, values) in recipes.items():
            if method not in self.methods:
                continue
            p = {"method": method} if "method" in self.distributions else {}
            for key, dist in self.distributions.items():
                q = key.split(".")[0]
                if q in values:
                    p[key] = _clamp(dist, values[q])
            out[name] = self.complete(p)
        return out

    def presets(self) -> dict[str, dict[str, Any]]:
        """Named starting points for ``search.initial``: the :meth:`recipes` and, in a layer space, the
        :meth:`source_paths`."""
        return self.recipes() | self.source_paths()

    def source_paths(self) -> dict[str, dict[str, Any]]:
        """``path:<choice>`` for each layer choice but ``skip``: the network that choice stands for, its layers
        in depth order once (slots ``0..L-1``, offset 0, the rest skipped): the base, each expert as it is, and
        ``path:merged`` the plain merge at full depth (the ``uniform`` recipe's values).

        These are the points every merge is judged against; hm3 starts its start-up design with them. Empty
        without ``layers:``, or when a network of L layers cannot be laid out (more slots than layers and no
        ``skip`` choice); repaired into ``min_layers..max_layers``.
        """
        lp = self.layers
        if lp is None or (lp.slots > self.num_layers and SKIP not in lp.tokens):
            return {}
        recipe = self.recipes().get("uniform", {})
        out = {}
        for choice, token in zip(lp.choices, lp.tokens, strict=True):
            if token == SKIP:
                continue
            tokens = lp.repair([token if k < self.num_layers else SKIP for k in range(lp.slots)])
            p = {k: v for k, v in recipe.items() if not k.startswith(("layer.", "layer_offset."))}
            p.update({f"layer.{k}": lp.choices[lp.tokens.index(t)] for k, t in enumerate(tokens)})
            out[f"path:{choice}"] = self.complete(p)
        return out

    def summary(self, params: Mapping[str, Any]) -> str:
        """One line for tables, e.g. ``ties w=[.8,.4] d=[.5,.6] λ=1 layers=3:MMb-`` (grouped values: means).

        Layer codes per slot: ``M`` merged, ``b`` base, ``0``.. an expert, ``-`` skipped (after repair).
        """
        p = self.complete(params)
        method = p.get("method", self.methods[0])
        reads = [q.name for q in get_method(method).params if q.name in self.searched]
        parts = [method]
        for q in reads:
            if q in self._per_model:
                means = [np.mean([p[n] for row in self._names[q][i] for n in row]) for i in range(len(self.models))]
                parts.append(f"{_SYMBOL.get(q, q)}=[{','.join(_fmt(v) for v in means)}]")
        for q in reads:
            if q not in self._per_model:
                parts.append(f"{_SYMBOL.get(q, q)}={_fmt(p[q])}")
        if self.layers is not None:
            tokens = self.layers.repair([resolve_choice(p[f"layer.{k}"], self.models)
                                         for k in range(self.layers.slots)])
            code = "".join("M" if t == MERGED else "-" if t == SKIP else "b" if t == -1 else str(t) for t in tokens)
            parts.append(f"layers={sum(t != SKIP for t in tokens)}:{code}")
        if p.get("correct", self.correct[0]) != "none":
            parts.append(f"correct={p.get('correct', self.correct[0])}")
        if p.get("align", self.align[0]) != "none":
            parts.append(f"align={p.get('align', self.align[0])}")
        if self.twin is not None:
            parts.append(f"twin r={self.twin.rank if isinstance(self.twin.rank, int) else p['twin.rank']}")
            label = p.get("twin.targets", next(iter(self.twin_targets)))
            if self.twin_targets[label] != (None, None):
                parts.append(f"on {label}")
            if self.twin.distill is not None:
                parts.append("distilled")
        return " ".join(parts)


def _check(space: SpaceConfig, models: list[str], num_layers: int) -> None:
    """Validation that needs the models and the layer count (the YAML schema checks the rest)."""
    if not models:
        raise ConfigError("models: no models to merge")
    if num_layers < 1:
        raise ConfigError(f"base_model: has {num_layers} layers")
    for m in space.methods:
        if m not in METHODS:
            raise ConfigError(f"space.methods: unknown method '{m}' (known: {', '.join(METHODS)})")
    dup = sorted({m for m in space.methods if space.methods.count(m) > 1})
    if dup:
        raise ConfigError(f"space.methods: '{dup[0]}' listed twice")
    for m in space.methods:
        info = get_method(m)
        with_base = info.base != "unused"  # a search passes the base to methods that can use it
        n = len(models) + with_base
        if m != "passthrough" and (n < info.min_inputs or (info.max_inputs is not None and n > info.max_inputs)):
            base = " including the base" if with_base else ""
            bound = (f"exactly {info.min_inputs}" if info.min_inputs == info.max_inputs else
                     f"{info.min_inputs}..{info.max_inputs}" if info.max_inputs else f"at least {info.min_inputs}")
            raise ConfigError(f"space.methods: {m} merges {bound} models{base}, got {n} ({len(models)} models"
                              f"{' + base' if with_base else ''})")
    if space.twin is not None and space.correct != ["none"]:
        raise ConfigError("space.correct: not combined with space.twin yet; use one of them")
    if space.correct != ["none"] and space.layers is not None:
        raise ConfigError("space.correct: corrections are fitted per base layer; remove space.layers")
    if space.twin is not None and space.align != ["none"]:
        raise ConfigError("space.twin: routes between the job's own experts; set space.align: [none]")
    if space.twin is not None and space.layers is not None:
        raise ConfigError("space.twin: the shared model must keep the base's layers; remove space.layers")
    if "passthrough" in space.methods and space.layers is None:
        raise ConfigError("space.methods: passthrough only copies layers; it needs space.layers")
    if isinstance(space.granularity, int) and space.granularity < 1:
        raise ConfigError(f"space.granularity: must be 'global', 'per_layer' or a positive int, "
                          f"got {space.granularity}")
    ranges = space.ranges()
    for m in space.methods:
        for q in get_method(m).params:
            r = ranges.get(q.name) if q.bounds is not None else None
            if r is not None and not q.bounds[0] <= r.low <= r.high <= q.bounds[1]:
                raise ConfigError(f"space.{q.name}: must lie in [{q.bounds[0]:g}, {q.bounds[1]:g}] ({m}), got "
                                  f"[{r.low:g}, {r.high:g}]")
    for f in space.filters:
        if not f or f in ("*", "rest"):
            raise ConfigError(f"space.filters: '{f}' is not a tensor-name filter (the catch-all 'rest' is implicit)")
        if space.filters.count(f) > 1:
            raise ConfigError(f"space.filters: '{f}' listed twice")


def _twin_targets(twin: TwinSpace, base_model: str, num_layers: int
                  ) -> dict[str, tuple[tuple[str, ...] | None, tuple[int, ...] | None]]:
    """``space.twin.targets`` as label -> (modules, layers), each set checked against the base's decoder layers:
    every module entry and layer must select something (PEFT would silently adapt less), and the largest rank
    must fit every targeted weight.

    The module names come from the base checkpoint's tensor names (its header only); a checkpoint that cannot
    be read that way leaves the module check to the first trial (:func:`~mergesearch.twin.factors.select_targets`).

    Raises:
        ConfigError: one line naming ``space.twin.targets.<label>`` or ``space.twin.rank``.
    """
    from mergesearch.models import Checkpoint, layer_key
    from mergesearch.twin.factors import select_targets

    out: dict[str, tuple[tuple[str, ...] | None, tuple[int, ...] | None]] = {}
    shapes: dict[str, tuple[int, ...]] | None = None
    rank = twin.rank if isinstance(twin.rank, int) else int(twin.rank.high)
    for label, t in twin.targets.items():
        key = f"space.twin.targets.{label}"
        for layer in t.layers or ():
            if layer >= num_layers:
                raise ConfigError(f"{key}: layer {layer} does not exist (the base has layers 0..{num_layers - 1})")
        if t.modules is not None or t.layers is not None:
            if shapes is None:
                try:
                    shapes = dict(Checkpoint(base_model).shapes)
                except ModelError:
                    shapes = {}
            weights = [n for n, s in shapes.items()
                       if layer_key(n)[1] is not None and n.endswith(".weight") and len(s) == 2]
            if weights:
                for name in select_targets(weights, t.modules, t.layers, key=key):
                    if rank > min(shapes[name]):
                        raise ConfigError(f"space.twin.rank: {rank} is larger than tensor {name!r} "
                                          f"{tuple(shapes[name])} allows (max rank {min(shapes[name])})")
        out[label] = (None if t.modules is None else tuple(t.modules), None if t.layers is None else tuple(t.layers))
    return out


def build_space(space: SpaceConfig, *, base_model: str, models: list[str], num_layers: int,
                dtype: str = "float32", seed: int = 0, objectives: Sequence[str] = (),
                aligned: Mapping[str, Sequence[str]] | None = None) -> MergeSpace:
    """Build and validate the search space of a job.

    Args:
        space: the job's ``space:`` section.
        base_model: the base checkpoint (path or hub id), as plans should name it.
        models: the fine-tuned checkpoints, in order (expert ``i`` is ``models[i]``).
        num_layers: the base's ``num_hidden_layers``.
        dtype: the plans' ``dtype``.
        seed: ``random_seed`` of DARE/DELLA plans, so a plan is reproducible.
        objectives: the job's task objective names (a twin space pairs them with the experts).
        aligned: align choice -> aligned experts' paths (:func:`mergesearch.merging.aligned.expert_sets`).

    Raises:
        ConfigError: one line naming the offending ``space`` key.
    """
    return MergeSpace(space, base_model=base_model, models=models, num_layers=num_layers, dtype=dtype, seed=seed,
                      objectives=objectives, aligned=aligned)


def num_layers_of(model: str | Path) -> int:
    """``num_hidden_layers`` of a local checkpoint or hub id (reads only its config)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise ModelError(f"base_model: cannot read the config of {model} ({str(e).splitlines()[0]})") from None
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise ConfigError(f"base_model: {model} has no num_hidden_layers in its config")
    return n


__all__ = ["MergeSpace", "build_space", "num_layers_of"]
