"""Objectives: score a (resident, merged) model on tasks and costs.

Build once per worker with :func:`build_objectives`, then call :func:`evaluate` per trial. Types are listed
in :data:`OBJECTIVES` (``exact_match``, ``loglik``, ``choice``, ``perplexity``, ``python``, ``lm_eval``,
``l1_from_base``, ``nonzero_delta``, ``params``, ``layers``, ``latency``).
"""

from __future__ import annotations

from mergesearch.objectives.base import Objective, ObjectiveBase, ObjectiveContext, Params
from mergesearch.objectives.model_dir import SafetensorsState, evaluate_model_dir
from mergesearch.objectives.registry import OBJECTIVES, build_objectives, evaluate, validate_objective

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveBase",
    "ObjectiveContext",
    "Params",
    "SafetensorsState",
    "build_objectives",
    "evaluate",
    "evaluate_model_dir",
    "validate_objective",
]
