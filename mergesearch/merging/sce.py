"""SCE merging — select, calculate, erase (mergekit 0.1.5's ``sce``; arXiv:2408.07990).

Select the entries where the experts' task vectors disagree most (top ``select_topk`` fraction by variance),
weight each expert by the mean square of its selected task vector, erase the entries whose sign disagrees with
the (TIES-style) majority, and average what is left. Computed in float64 from exact inputs, rounded
once. Semantics: ``METHODS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.merging.ops import TensorGroup, _base, _emit, _precise


def select_mask(taus: torch.Tensor, select_topk: float) -> torch.Tensor | None:
    """The entries kept by variance across the experts.

    Args:
        taus: (N, *S) stacked task vectors.
        select_topk: fraction of the entries with non-zero variance to keep; >= 1 keeps all, <= 0 none.

    Returns:
        (*S) boolean mask, or None when every entry is kept. k = int(count_nonzero(var) · select_topk) entries of
        largest (population) variance are kept; ties at the cut are broken by ``torch.topk``, as mergekit does
        (deterministic, but the choice among equal variances may differ between devices).
    """
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros(taus.shape[1:], dtype=torch.bool, device=taus.device)
    var = torch.var(taus, dim=0, unbiased=False)
    # int(tensor · float), as mergekit rounds it (the product is taken in the default float dtype)
    k = int(torch.count_nonzero(var) * select_topk)
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=taus.device)
    if k > 0:
        mask[torch.topk(var.reshape(-1), k).indices] = True
    return mask.reshape(var.shape)


def expert_weights(taus: torch.Tensor) -> torch.Tensor:
    """(N,) weights: the mean of each expert's squared task vector, normalised to sum 1 (equal weights when
    the sum is below 1e-6, i.e. all task vectors are ~zero).

    Args:
        taus: (N, *S) stacked (selected) task vectors.
    """
    w = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = w.sum().item()
    if abs(total) < 1e-6:
        return torch.full_like(w, 1.0 / w.shape[0])
    return w / total


def sign_agreement(taus: torch.Tensor) -> torch.Tensor:
    """(N, *S) boolean: τᵢ's sign equals the sign of Σᵢ τᵢ (a zero sum counts as +; zero entries never agree)."""
    majority = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
    return taus.sign() == majority


def sce(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ0 + Σᵢ wᵢmᵢτᵢ / max(Σᵢ wᵢmᵢ, 1e-6), τᵢ restricted to the selected entries, mᵢ the sign agreement.

    ``int8_mask`` only changes the dtype of mergekit's masks, never the result: accepted and unused.
    """
    b = _base(group)
    base = group.tensor(b)
    idx = [i for i in range(group.n) if i != b]
    if not idx:
        return _emit(group, base)
    taus = torch.stack([group.exact_task_vector(i) for i in idx])  # (N, *S)
    mask = select_mask(taus, float(shared["select_topk"]))
    if mask is not None:
        taus = taus * mask
    w = expert_weights(taus).reshape(-1, *([1] * (taus.dim() - 1)))  # (N, 1, ...) broadcasts over S
    kept = w * sign_agreement(taus)  # (N, *S): wᵢ where τᵢ agrees, else 0
    merged = (taus * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=1e-6)
    return _emit(group, (_precise(base) + merged).to(base.dtype))
