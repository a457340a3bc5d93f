"""NearSwap (mergekit 0.1.5's ``nearswap``): take the other model's value where it is near the base's.

Per entry, w = clamp(t / max(|θ0 − θ1|, 1e-6), 0, 1) and θ = w·θ1 + (1 − w)·θ0 = θ0 + w·τ: entries that moved
less than t are swapped in whole, larger moves shrink to a change of about t. Semantics: ``METHODS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.ops import TensorGroup, _base, _emit, _precise


def nearswap_delta(tau: torch.Tensor, t: float) -> torch.Tensor:
    """w·τ for a task vector τ of shape S, w = clamp(t / max(|τ|, 1e-6), 0, 1) per entry (t <= 0: zeros)."""
    w = (t / tau.abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * tau


def nearswap(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ0 + w·(θ1 − θ0): the base and exactly one other model (t = 0 gives the base)."""
    b = _base(group)
    if group.n != 2:
        raise ConfigError(f"tensor {group.name!r}: nearswap merges the base and exactly 1 other model, "
                          f"got {group.n - 1} others")
    base = group.tensor(b)
    tau = group.exact_task_vector(1 - b)
    return _emit(group, (_precise(base) + nearswap_delta(tau, float(shared["t"]))).to(base.dtype))
