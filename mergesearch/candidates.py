"""What a trial evaluates: a candidate built on the resident merger — one seam for every family.

A **static** candidate is one merge plan written into the resident model. A **twin** candidate (Twin-Merging,
Lu et al. 2024) is a static plan (the shared model θ*) plus, for each expert, the rank-r truncated SVD of
θt − θ* mixed per input by a router trained on the tasks' search prompts. A **corrected** candidate
(variance-collapse correction, Sharma et al. 2024) is a static plan plus per-task affine maps of every block's
output, mixed by such a router. The worker, the exporter and the cost
objectives see only this interface:

- ``spec()``: what the study stores (``candidate_from(spec)`` rebuilds the candidate; a bare plan dict, as older
  studies stored, is a static candidate);
- ``build(ctx)``: a model the objectives can run (a HF causal LM or a routed model with the same surface);
- ``release(model)``: undo what ``build`` attached to the resident model before the next trial;
- ``export(ctx, model, out_dir, …)``: write it where users load it (``mergesearch.load_model``).

A new family is one class here plus one entry in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mergesearch.errors import ConfigError
from mergesearch.merging.plan import MergePlan

if TYPE_CHECKING:
    from torch import nn

    from mergesearch.merging.apply import ResidentMerger


@dataclass(frozen=True)
class CandidateContext:
    """What building a candidate may use, held by a worker (or the exporter).

    Attributes:
        merger: the resident merger (base, experts' task vectors, the resident model).
        tokenizer: the base's tokenizer.
        prompts: objective name -> its search-split prompts (to train a router on).
        seed: the study's seed (randomized SVDs, router initialisation).
        cache: per-context memo of a family's trial-independent work.
    """

    merger: ResidentMerger
    tokenizer: Any
    prompts: Callable[[str], list[str]]
    seed: int = 0
    #: what a family computes once per context and reuses across trials (e.g. experts' activation statistics)
    cache: dict[Any, Any] = field(default_factory=dict)


class Candidate(Protocol):
    """A family member a trial evaluates (see the module docstring)."""

    family: ClassVar[str]
    plan: MergePlan

    def spec(self) -> dict[str, Any]: ...

    def build(self, ctx: CandidateContext) -> nn.Module: ...

    def release(self, model: nn.Module) -> None: ...

    def export(self, ctx: CandidateContext, model: nn.Module, out_dir: Path, *, recipe: MergePlan,
               extra_files: Mapping[str, str], overwrite: bool = False) -> Path: ...


@dataclass(frozen=True)
class Static:
    """One merge plan written into the resident model."""

    plan: MergePlan
    family: ClassVar[str] = "static"

    def spec(self) -> dict[str, Any]:
        return {"family": self.family, "plan": self.plan.to_dict()}

    def build(self, ctx: CandidateContext) -> nn.Module:
        return ctx.merger.apply(self.plan)

    def release(self, model: nn.Module) -> None:
        """Nothing to undo: the next plan overwrites every merged tensor."""

    def export(self, ctx: CandidateContext, model: nn.Module, out_dir: Path, *, recipe: MergePlan,
               extra_files: Mapping[str, str], overwrite: bool = False) -> Path:
        from mergesearch.merging.run import save_model_dir

        return save_model_dir(model, out_dir, tokenizer_source=ctx.merger.tokenizer_path, recipe=recipe,
                              overwrite=overwrite, extra_files=extra_files)


@dataclass(frozen=True)
class Twin:
    """Twin-Merging: the plan's merge shared, each expert's exclusive part at rank ``rank``, a router mixing them.

    Attributes:
        plan: the shared merge θ*.
        rank: r of every exclusive part (0: the shared model alone).
        experts: (objective name, model) pairs: expert ``model`` serves the task scored by that objective, whose
            search prompts train the router; router outputs follow this order.
        router: :class:`~mergesearch.twin.router.RouterSettings` fields (e.g. ``{"width": 64}``).
        modules, layers: the decoder layers' linear modules that get factors (PEFT ``target_modules`` /
            ``layers_to_transform``; ``None``: all).
        distill: :class:`~mergesearch.twin.distill.DistillSettings` fields: fit the factors to the experts'
            outputs on their tasks' fit prompts (``None``: the SVD factors).
        fit_data: objective name -> file of that task's fit prompts (``space.twin.fit_data``), on which the router
            is trained and the factors distilled, checked disjoint from the prompts the objective scores
            (:mod:`mergesearch.twin.data`); ``None``: fitted on the objectives' own search prompts.
    """

    plan: MergePlan
    rank: int
    experts: tuple[tuple[str, str], ...]
    router: Mapping[str, Any] = field(default_factory=dict)
    modules: tuple[str, ...] | None = None
    layers: tuple[int, ...] | None = None
    distill: Mapping[str, Any] | None = None
    fit_data: Mapping[str, str] | None = None
    family: ClassVar[str] = "twin"

    def spec(self) -> dict[str, Any]:
        out = {"family": self.family, "plan": self.plan.to_dict(), "rank": self.rank,
               "experts": [list(e) for e in self.experts], "router": dict(self.router)}
        # written only when set, so the specs of studies made before these settings read back the same
        if self.modules is not None:
            out["modules"] = list(self.modules)
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.distill is not None:
            out["distill"] = dict(self.distill)
        if self.fit_data is not None:
            out["fit_data"] = dict(self.fit_data)
        return out

    def build(self, ctx: CandidateContext) -> nn.Module:
        from mergesearch.twin import RouterSettings, build_twin
        from mergesearch.twin.distill import DistillSettings

        fit = self.fit_data or {}
        prompts = [_fit_prompts(ctx, objective, fit.get(objective)) for objective, _ in self.experts]
        router = RouterSettings(**self.router)
        distill = teachers = None
        if self.distill is not None and self.rank > 0:
            distill = DistillSettings(**self.distill)
            # before the shared plan is applied: the teachers need each expert in the resident model
            teachers = [_teacher(ctx, model, objective, fit.get(objective), distill, router.chat_template)
                        for objective, model in self.experts]
        return build_twin(ctx.merger, self.plan, self.rank, prompts, experts=[m for _, m in self.experts],
                          names=[o for o, _ in self.experts], router=router, tokenizer=ctx.tokenizer,
                          seed=ctx.seed, modules=self.modules, layers=self.layers, distill=distill,
                          teachers=teachers)

    def release(self, model: nn.Module) -> None:
        model.detach()  # type: ignore[operator]  # remove the adapters' hooks from the resident model

    def export(self, ctx: CandidateContext, model: nn.Module, out_dir: Path, *, recipe: MergePlan,
               extra_files: Mapping[str, str], overwrite: bool = False) -> Path:
        return _export_routed(self.spec(), ctx, model, out_dir, recipe, extra_files, overwrite)


@dataclass(frozen=True)
class Corrected:
    """Variance-collapse correction: the plan's merge with, per task, an affine map of every block's output that
    gives it expert t's per-channel mean and std on task t's prompts; the router (or a task id) picks the map.

    Attributes:
        plan: the merge being corrected.
        experts: (objective name, model) pairs: task t's statistics come from ``model`` on that objective's
            search prompts; router outputs follow this order.
        router: :class:`~mergesearch.twin.router.RouterSettings` fields.
    """

    plan: MergePlan
    experts: tuple[tuple[str, str], ...]
    router: Mapping[str, Any] = field(default_factory=dict)
    family: ClassVar[str] = "corrected"

    def spec(self) -> dict[str, Any]:
        return {"family": self.family, "plan": self.plan.to_dict(), "experts": [list(e) for e in self.experts],
                "router": dict(self.router)}

    def build(self, ctx: CandidateContext) -> nn.Module:
        from mergesearch.twin import RoutedModel, RouterSettings, TwinFactors, train_router
        from mergesearch.twin.correct import decoder_layers, fit_corrections

        prompts = [ctx.prompts(objective) for objective, _ in self.experts]
        layers = decoder_layers(ctx.merger.model)
        stats = [_expert_stats(ctx, model, objective, layers) for objective, model in self.experts]
        shared = ctx.merger.apply(self.plan)
        corrections = fit_corrections(shared, ctx.tokenizer, prompts, stats, layers)
        router = train_router(shared, ctx.tokenizer, prompts, RouterSettings(**self.router), seed=ctx.seed)
        factors = TwinFactors(tuple(m for _, m in self.experts), tuple(o for o, _ in self.experts), 0, {}, {})
        return RoutedModel(shared, factors, router, corrections=corrections)

    def release(self, model: nn.Module) -> None:
        model.detach()  # type: ignore[operator]

    def export(self, ctx: CandidateContext, model: nn.Module, out_dir: Path, *, recipe: MergePlan,
               extra_files: Mapping[str, str], overwrite: bool = False) -> Path:
        return _export_routed(self.spec(), ctx, model, out_dir, recipe, extra_files, overwrite)


def _expert_plan(merger: ResidentMerger, model: str) -> MergePlan:
    """The plan that puts expert ``model`` (θ0 + τ) into the resident model."""
    from mergesearch.merging.plan import InputModel

    return MergePlan(merge_method="task_arithmetic", base_model=merger.base,
                     dtype=str(merger.dtype).removeprefix("torch."),
                     models=[InputModel(model=model, parameters={"weight": 1.0})])


def _expert_stats(ctx: CandidateContext, model: str, objective: str, layers: Sequence[str]) -> Any:
    """Expert ``model``'s block-output statistics on ``objective``'s prompts, computed once per context."""
    key = ("expert_stats", model, objective)
    if key not in ctx.cache:
        from mergesearch.twin.correct import block_stats

        expert = ctx.merger.apply(_expert_plan(ctx.merger, model))
        ctx.cache[key] = block_stats(expert, ctx.tokenizer, ctx.prompts(objective), layers)
    return ctx.cache[key]


def _fit_prompts(ctx: CandidateContext, objective: str, path: str | None) -> list[str]:
    """The prompts a twin fits on for ``objective`` (its ``fit_data`` file, checked disjoint from the prompts the
    objective scores; without one, those prompts), read once per context."""
    key = ("twin_fit", objective, path)
    if key not in ctx.cache:
        from mergesearch.twin.data import fit_prompts

        ctx.cache[key] = fit_prompts(objective, path, ctx.prompts(objective))
    return ctx.cache[key]


def _teacher(ctx: CandidateContext, model: str, objective: str, path: str | None, settings: Any,
             chat_template: bool) -> Any:
    """Expert ``model``'s distillation targets on the prompts it fits ``objective`` on (``path``: its fit file; a
    twin ``Teacher``), computed once per context: they do not depend on the trial's shared merge. Leaves the
    expert in the resident model."""
    key = ("twin_teacher", model, objective, path, settings.max_new_tokens, settings.top_k, chat_template)
    if key not in ctx.cache:
        from mergesearch.objectives.scoring import encode_prompt
        from mergesearch.twin.distill import expert_teacher

        expert = ctx.merger.apply(_expert_plan(ctx.merger, model))
        ids = [encode_prompt(ctx.tokenizer, p, chat_template) for p in _fit_prompts(ctx, objective, path)]
        ctx.cache[key] = expert_teacher(expert, ctx.tokenizer, ids, settings)
    return ctx.cache[key]


def _export_routed(spec: dict[str, Any], ctx: CandidateContext, model: nn.Module, out_dir: Path, recipe: MergePlan,
                   extra_files: Mapping[str, str], overwrite: bool) -> Path:
    """A routed family's export: the shared merge as a HF directory plus its routed parts (:func:`export_twin`)."""
    from mergesearch.merging.plan import plan_to_yaml
    from mergesearch.twin import export_twin

    meta = {"candidate": spec, "recipe": plan_to_yaml(recipe)}
    out = export_twin(out_dir, model.shared, ctx.merger.tokenizer_path, model.factors,  # type: ignore[union-attr]
                      model.router, meta, overwrite=overwrite, corrections=model.corrections)  # type: ignore[union-attr]
    for name, text in extra_files.items():
        (out / name).write_text(text)
    (out / "recipe.yaml").write_text(plan_to_yaml(recipe))  # the shared merge, replayable alone
    return out


FAMILIES: dict[str, Callable[[Mapping[str, Any]], Candidate]] = {
    "static": lambda s: Static(MergePlan.model_validate(s["plan"])),
    "twin": lambda s: Twin(MergePlan.model_validate(s["plan"]), int(s["rank"]),
                           tuple((str(o), str(m)) for o, m in s["experts"]), dict(s.get("router") or {}),
                           None if s.get("modules") is None else tuple(str(m) for m in s["modules"]),
                           None if s.get("layers") is None else tuple(int(x) for x in s["layers"]),
                           None if s.get("distill") is None else dict(s["distill"]),
                           None if s.get("fit_data") is None else {str(k): str(v) for k, v in s["fit_data"].items()}),
    "corrected": lambda s: Corrected(MergePlan.model_validate(s["plan"]),
                                     tuple((str(o), str(m)) for o, m in s["experts"]), dict(s.get("router") or {})),
}


def candidate_from(spec: Mapping[str, Any]) -> Candidate:
    """The candidate a stored spec describes; a bare plan dict (no ``family``) is a static candidate.

    Raises:
        ConfigError: an unknown family.
    """
    if "family" not in spec:
        return Static(MergePlan.model_validate(spec))
    family = spec["family"]
    if family not in FAMILIES:
        raise ConfigError(f"unknown candidate family {family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family](spec)


def load_model(directory: str | Path, *, device: str = "cpu", dtype: Any = None) -> nn.Module:
    """Load what ``export`` wrote, whatever the family: a routed twin model (``twin.json`` present) or a plain
    Hugging Face causal LM. Safetensors only; no remote code runs.

    Args:
        directory: an exported model directory.
        device: where to put it. dtype: a torch dtype (default: as stored).

    Raises:
        ModelError: not a loadable model directory.
    """
    from mergesearch.errors import ModelError

    path = Path(directory)
    if (path / "twin.json").is_file():
        from mergesearch.twin import load_twin

        return load_twin(path, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, use_safetensors=True,
                                                    dtype=dtype or "auto").to(device).eval()
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{directory}: cannot load model ({reason})") from None


def check_twin_rank(rank: int, shapes: Mapping[str, Sequence[int]]) -> None:
    """ConfigError unless every linear weight of the decoder layers can hold a rank-``rank`` part.

    Args:
        rank: the largest rank a twin space asks for.
        shapes: tensor name -> shape of the base checkpoint.
    """
    from mergesearch.models import layer_key

    for name, shape in shapes.items():
        if layer_key(name)[1] is not None and name.endswith(".weight") and len(shape) == 2 and rank > min(shape):
            raise ConfigError(f"space.twin.rank: {rank} is larger than tensor {name!r} {tuple(shape)} allows "
                              f"(max rank {min(shape)})")


def objective_prompts(objectives: Sequence[Any]) -> Callable[[str], list[str]]:
    """``name -> prompts`` of the job's prompt-based objectives (their loaded split), for a context's ``prompts``.

    Raises (when called): ConfigError naming an objective that has no prompts.
    """
    by_name = {o.name: o for o in objectives}

    def prompts(name: str) -> list[str]:
        examples = getattr(by_name.get(name), "examples", None)
        if not examples:
            raise ConfigError(f"objective {name!r} has no prompts to train a twin router on (use a task objective "
                              "with a data file: exact_match, loglik, choice)")
        return [str(ex["prompt"]) for ex in examples]

    return prompts


def stored_candidate(user_attrs: Mapping[str, Any]) -> Candidate:
    """The candidate a trial evaluated, from its user attributes (``plan``, ``family``, ``candidate``)."""
    return candidate_from({"plan": user_attrs["plan"], "family": user_attrs.get("family", "static"),
                           **(user_attrs.get("candidate") or {})})


def twin_experts(mapping: Mapping[str, str] | None, objectives: Sequence[str], models: Sequence[str]
                 ) -> tuple[tuple[str, str], ...]:
    """The (objective, model) pairs of a twin space: ``mapping`` checked, or objectives and models in order.

    Args:
        mapping: ``space.twin.experts`` (objective name -> model, a path or the model's index), or None.
        objectives: the job's task objective names, in order.
        models: the job's expert models, in order.

    Raises:
        ConfigError: fewer than two experts, an unknown objective or model, a model named twice.
    """
    if len(models) < 2:
        raise ConfigError(f"space: routing (twin, correct) needs at least two experts; the job has {len(models)} model")
    if mapping is None:
        if len(objectives) < len(models):
            raise ConfigError(f"space: routing needs one task objective with data per model ({len(models)} "
                              f"models, {len(objectives)} task objectives with prompts to train the router and "
                              "fit corrections on); set space.twin.experts (objective: model)")
        return tuple(zip(objectives, models, strict=False))
    pairs = []
    for objective, ref in mapping.items():
        if objective not in objectives:
            raise ConfigError(f"space.twin.experts: unknown objective {objective!r} (task objectives: "
                              f"{', '.join(objectives)})")
        model = models[int(ref)] if str(ref).isdigit() and int(ref) < len(models) else str(ref)
        if model not in models:
            raise ConfigError(f"space.twin.experts: {objective}: unknown model {ref!r} (models: "
                              f"{', '.join(models)})")
        pairs.append((objective, model))
    if len({m for _, m in pairs}) != len(pairs) or len(pairs) < 2:
        raise ConfigError("space.twin.experts: name at least two different models, each once")
    return tuple(pairs)
