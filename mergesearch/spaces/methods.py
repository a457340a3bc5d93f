"""Which searchable parameters each merge method reads (METHODS.md, mergekit semantics).

A space holds the union of the parameters of its methods; when a trial picks a method, the decoder keeps
only the parameters that method reads, so a plan never carries a parameter its method would ignore.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    """What a merge method reads from a search space.

    Attributes:
        per_model: per-model tensor parameters (``weight``, ``density``), searched per layer group.
        shared: method-level scalars (``lambda``, ``t``, ``epsilon``), one per plan.
        uses_base: the base model is an input (task vectors, slerp's first end, model_stock's anchor).
        random: the method draws random masks, so the plan carries ``random_seed``.
    """

    per_model: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    uses_base: bool = True
    random: bool = False


_TASK = ("weight",)
_SPARSE = ("weight", "density")

METHODS: dict[str, MethodInfo] = {
    "linear": MethodInfo(per_model=_TASK, uses_base=False),
    "task_arithmetic": MethodInfo(per_model=_TASK, shared=("lambda",)),
    "ties": MethodInfo(per_model=_SPARSE, shared=("lambda",)),
    "dare_linear": MethodInfo(per_model=_SPARSE, shared=("lambda",), random=True),
    "dare_ties": MethodInfo(per_model=_SPARSE, shared=("lambda",), random=True),
    # textbook DARE rescale (1/d) instead of mergekit's L1-norm matching (METHODS.md variant)
    "dare_linear_invdensity": MethodInfo(per_model=_SPARSE, shared=("lambda",), random=True),
    "dare_ties_invdensity": MethodInfo(per_model=_SPARSE, shared=("lambda",), random=True),
    "breadcrumbs": MethodInfo(per_model=_SPARSE, shared=("lambda",)),
    "breadcrumbs_ties": MethodInfo(per_model=_SPARSE, shared=("lambda",)),
    "della": MethodInfo(per_model=_SPARSE, shared=("lambda", "epsilon"), random=True),
    "della_linear": MethodInfo(per_model=_SPARSE, shared=("lambda", "epsilon"), random=True),
    "slerp": MethodInfo(shared=("t",)),
    "model_stock": MethodInfo(),
    "passthrough": MethodInfo(),
}

#: value a plan gets for a parameter its method needs but the space does not search.
FIXED_DEFAULTS: dict[str, float] = {"weight": 1.0, "t": 0.5, "epsilon": 0.15}
