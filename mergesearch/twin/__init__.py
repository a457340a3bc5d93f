"""Twin-Merging (Lu et al., arXiv 2406.15479): a shared merge plus routed low-rank expert parts.

- :mod:`~mergesearch.twin.factors`: per expert, rank-r SVD factors of θt − θ* for the targeted linear weights of
  the blocks (``compute_factors``, ``select_targets``), and the family's cost (``extra_params``,
  ``extra_param_ratio``).
- :mod:`~mergesearch.twin.distill`: the factors fitted to the experts' outputs (``distill_factors``,
  ``expert_teacher``).
- :mod:`~mergesearch.twin.data`: the prompts a twin is fitted on (``space.twin.fit_data``), checked disjoint from
  the prompts its trials are scored on (``fit_prompts``, ``check_fit_data``).
- :mod:`~mergesearch.twin.router`: the MLP router on the shared model's pooled prompt state (``train_router``).
- :mod:`~mergesearch.twin.routed`: ``RoutedModel``, usable wherever an objective takes a HF causal LM.
- :mod:`~mergesearch.twin.io`: ``export_twin`` (HF shared model + PEFT LoRA adapters + router) and ``load_twin``.
- :mod:`~mergesearch.twin.build`: ``build_twin``, the one call from a resident merger and a plan.

Names resolve lazily, so importing this package imports neither torch nor transformers nor peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "TwinFactors": "mergesearch.twin.factors",
    "compute_factors": "mergesearch.twin.factors",
    "extra_params": "mergesearch.twin.factors",
    "extra_param_ratio": "mergesearch.twin.factors",
    "select_targets": "mergesearch.twin.factors",
    "DistillSettings": "mergesearch.twin.distill",
    "distill_factors": "mergesearch.twin.distill",
    "expert_teacher": "mergesearch.twin.distill",
    "Router": "mergesearch.twin.router",
    "RouterSettings": "mergesearch.twin.router",
    "train_router": "mergesearch.twin.router",
    "RoutedModel": "mergesearch.twin.routed",
    "export_twin": "mergesearch.twin.io",
    "load_twin": "mergesearch.twin.io",
    "build_twin": "mergesearch.twin.build",
}

__all__ = [  # spelled out (not sorted(_LAZY)) so linters see the TYPE_CHECKING imports as re-exports
    "DistillSettings", "RoutedModel", "Router", "RouterSettings", "TwinFactors", "build_twin", "compute_factors",
    "distill_factors", "expert_teacher", "export_twin", "extra_param_ratio", "extra_params", "load_twin",
    "select_targets", "train_router",
]

if TYPE_CHECKING:
    from mergesearch.twin.build import build_twin
    from mergesearch.twin.distill import DistillSettings, distill_factors, expert_teacher
    from mergesearch.twin.factors import (
        TwinFactors,
        compute_factors,
        extra_param_ratio,
        extra_params,
        select_targets,
    )
    from mergesearch.twin.io import export_twin, load_twin
    from mergesearch.twin.routed import RoutedModel
    from mergesearch.twin.router import Router, RouterSettings, train_router


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mergesearch.twin' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
