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


def build_twin(merger: ResidentMerger, plan: MergePlan, rank: int, prompts: Sequence[Sequence[str]], *,
               experts: Sequence[str] | None = None, names: Sequence[str] | None = None,
               router: RouterSettings | None = None, tokenizer: Any = None, seed: int = 0) -> RoutedModel:
    """Twin-merge the merger's experts around ``plan``'s merge.

    Applies ``plan`` (θ*), factors θt − θ* at ``rank`` for every expert (:func:`compute_factors`), trains a router
    on ``prompts`` (:func:`train_router`) and hooks both onto the resident model. The returned model wraps the
    merger's resident model: call ``detach()`` on it before the merger applies another plan's hooks elsewhere
    (its hooks are inert outside routed calls, so plain use of ``merger.model`` still sees θ*).

    Args:
        merger: the resident merger (experts loaded, their τ cached).
        plan: the shared merge (any static plan keeping the base's layers).
        rank: r of every exclusive part.
        prompts: ``prompts[t]``: prompts of expert t's task, experts in ``experts`` order.
        experts, names: which experts (default: all of the merger's) and their short names.
        router: router settings (default :class:`RouterSettings`).
        tokenizer: encodes the prompts (default: the merger's).
        seed: seeds the randomized SVDs and the router.

    Raises:
        ConfigError: a bad rank or plan (see :func:`compute_factors`), prompts not one list per expert.
    """
    from mergesearch.errors import ConfigError

    shared = merger.apply(plan)
    factors = compute_factors(merger, rank, experts=experts, names=names, seed=seed)
    if len(prompts) != len(factors.experts):
        raise ConfigError(f"twin router: {len(prompts)} prompt lists for {len(factors.experts)} experts")
    trained = train_router(shared, tokenizer or merger.tokenizer, prompts, router, seed=seed)
    return RoutedModel(shared, factors, trained)
