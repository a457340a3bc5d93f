"""RAM — Reinforced Agent Merging (mergekit 0.1.5's ``ram`` and ``ramplus_tl``; arXiv:2601.13572).

An entry of a task vector counts as changed when |τᵢ| > epsilon. Entries changed by one expert only (unique)
are kept as they are; entries changed by several (overlapping) are averaged over the experts that changed them,
so overlaps are not diluted by the experts that left them alone. RAM+ (tensor-local) additionally scales each
expert's unique entries by λᵢ = 1 + r·clamp(ρᵢ, 0, alpha), ρᵢ = (#its overlapping changed entries) /
(#its unique ones) within the tensor. Computed in float64 from exact inputs. Semantics: ``METHODS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.merging.ops import TensorGroup, _base, _emit, _precise


def changed(taus: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which entries each expert changed, and by how many experts each entry was changed.

    Args:
        taus: (N, D) flat task vectors.

    Returns:
        (N, D) boolean |τᵢ| > epsilon, and (D,) int64 counts of experts changing each entry.
    """
    nonzero = taus.abs() > epsilon
    return nonzero, nonzero.sum(dim=0)


def ram_delta(taus: torch.Tensor, nonzero: torch.Tensor, count: torch.Tensor,
              unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(D,) merged task vector: Σᵢ over the experts that changed an entry, of τᵢ·λᵢ where it alone changed it
    and τᵢ/count where count > 1 experts did (0 where none did).

    Args:
        taus: (N, D) flat task vectors; ``nonzero``, ``count``: :func:`changed` of them.
        unique_scale: (N,) λᵢ for RAM+ (None: 1).
    """
    kept = taus * nonzero
    unique = (count == 1).unsqueeze(0)  # (1, D)
    overlap = kept / count.clamp(min=1)
    solo = kept if unique_scale is None else kept * unique_scale.unsqueeze(1)
    return torch.where(unique, solo, overlap).sum(dim=0)


def ramplus_scale(nonzero: torch.Tensor, count: torch.Tensor, r: float, alpha: float, epsilon: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """(N,) λᵢ = 1 + r·clamp(ρᵢ, 0, alpha) with ρᵢ = shared_i / max(unique_i, epsilon) counted over the tensor
    (torch.clamp semantics: alpha < 0 gives alpha). An expert without unique entries gets λ = 1: λ scales only
    its unique entries, so any finite value gives the same result (mergekit's ρ is 0/0 there when epsilon <= 0).

    Args:
        nonzero, count: :func:`changed` of the (N, D) task vectors.
        dtype: the working dtype.
    """
    shared_n = (nonzero & (count > 1)).sum(dim=1).to(dtype)  # (N,)
    unique_n = (nonzero & (count == 1)).sum(dim=1).to(dtype)
    rho = shared_n / unique_n.clamp(min=epsilon if epsilon > 0 else 1.0)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return torch.where(unique_n > 0, lam, torch.ones_like(lam))


def _taus(group: TensorGroup, b: int) -> torch.Tensor:
    """(N, D) flat task vectors of the non-base inputs, in the working dtype."""
    return torch.stack([group.exact_task_vector(i).reshape(-1) for i in range(group.n) if i != b])


def ram(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ0 + RAM merge of the task vectors (unique changes kept, overlapping ones averaged)."""
    b = _base(group)
    base = group.tensor(b)
    if group.n == 1:
        return _emit(group, base)
    taus = _taus(group, b)
    merged = ram_delta(taus, *changed(taus, float(shared["epsilon"])))
    return _emit(group, (_precise(base) + merged.reshape(base.shape)).to(base.dtype))


def ramplus_tl(group: TensorGroup, shared: Mapping[str, Any],
               per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ0 + RAM+ (tensor-local) merge: RAM with each expert's unique changes scaled by its λᵢ."""
    b = _base(group)
    base = group.tensor(b)
    if group.n == 1:
        return _emit(group, base)
    taus = _taus(group, b)
    nonzero, count = changed(taus, float(shared["epsilon"]))
    lam = ramplus_scale(nonzero, count, float(shared["r"]), float(shared["alpha"]), float(shared["epsilon"]),
                        taus.dtype)
    merged = ram_delta(taus, nonzero, count, lam)
    return _emit(group, (_precise(base) + merged.reshape(base.shape)).to(base.dtype))
