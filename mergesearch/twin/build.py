"""One call from a resident merger to a routed twin model: shared merge, exclusive factors, router."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mergesearch.twin.factors import compute_factors
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import RouterSettings, train_router

if TYPE_CHECKING:
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan
    from mergesearch.twin.distill import DistillSettings, Teacher


def build_twin(merger: ResidentMerger, plan: MergePlan, rank: int, prompts: Sequence[Sequence[str]], *,
               experts: Sequence[str] | None = None, names: Sequence[str] | None = None,
               router: RouterSettings | None = None, tokenizer: Any = None, seed: int = 0,
               modules: Sequence[str] | None = None, layers: Sequence[int] | None = None,
               distill: DistillSettings | None = None, teachers: Sequence[Teacher] | None = None) -> RoutedModel:
    """Twin-merge the merger's experts around ``plan``'s merge.

    Applies ``plan`` (θ*), factors θt − θ* at ``rank`` for every expert on the targeted modules
    (:func:`compute_factors`), optionally fits the factors to the experts' outputs
    (:func:`~mergesearch.twin.distill.distill_factors`), trains a router on ``prompts`` (:func:`train_router`)
    and hooks both onto the resident model. The returned model wraps the merger's resident model: call
    ``detach()`` on it before the merger applies another plan's hooks elsewhere (its hooks are inert outside
    routed calls, so plain use of ``merger.model`` still sees θ*).

    Args:
        merger: the resident merger (experts loaded, their τ cached).
        plan: the shared merge (any static plan keeping the base's layers).
        rank: r of every exclusive part.
        prompts: ``prompts[t]``: prompts of expert t's task, experts in ``experts`` order.
        experts, names: which experts (default: all of the merger's) and their short names.
        router: router settings (default :class:`RouterSettings`).
        tokenizer: encodes the prompts (default: the merger's).
        seed: seeds the randomized SVDs, the distillation's batches and the router.
        modules, layers: the modules that get factors (default: every linear module of the decoder layers).
        distill: fit the factors to ``teachers`` (``None``: keep the SVD factors).
        teachers: ``teachers[t]``: expert t's targets (:func:`~mergesearch.twin.distill.expert_teacher`), computed
            before ``plan`` is applied (they need the expert in the resident model); required with ``distill``.

    Raises:
        ConfigError: a bad rank, plan or target (see :func:`compute_factors`), prompts not one list per expert,
            ``distill`` without teachers.
    """
    from mergesearch.errors import ConfigError

    if distill is not None and teachers is None:
        raise ConfigError("twin distillation needs the experts' targets (teachers)")
    shared = merger.apply(plan)
    factors = compute_factors(merger, rank, experts=experts, names=names, seed=seed, modules=modules, layers=layers)
    if len(prompts) != len(factors.experts):
        raise ConfigError(f"twin router: {len(prompts)} prompt lists for {len(factors.experts)} experts")
    report = None
    if distill is not None and factors.rank > 0:
        from mergesearch.twin.distill import distill_factors

        factors, report = distill_factors(shared, factors, teachers or (), distill, seed=seed)
    trained = train_router(shared, tokenizer or merger.tokenizer, prompts, router, seed=seed)
    routed = RoutedModel(shared, factors, trained)
    routed.distill_report = report  # what the fit did (None without distillation), for benchmarks and logs
    return routed
