"""Arcee Fusion (mergekit 0.1.5's ``arcee_fusion``): keep only the other model's most important changes.

Importance of an entry = |θ1 − θ0| · KL(softmax(θ1) ‖ softmax(θ0)), the KL taken along the last dim (one value
per row); entries whose importance reaches the Tukey fence median + 1.5·IQR of all importances take θ1's value,
the rest keep the base's. Above 1M entries the quantiles are estimated from 1M entries drawn with replacement
(mergekit draws them unseeded; here the draw is seeded from the tensor's seed, on the CPU so every device draws
the same entries). Computed in float64 from exact inputs. Semantics: ``METHODS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.ops import TensorGroup, _base, _emit, _precise

#: quantiles are estimated from this many sampled entries when a tensor has more
QUANTILE_SAMPLE = 1_000_000


def importance(theta: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """|θ − θ0| · KL(p ‖ q) with p = softmax(θ) + eps, q = softmax(θ0) + eps along the last dim.

    Args:
        theta, base: tensors of shape S (at least 1-D) in the working dtype.

    Returns:
        Tensor of shape S (each row's KL broadcast over the row).
    """
    p = torch.softmax(theta, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1)
    return (theta - base).abs() * kl


def tukey_fence(scores: torch.Tensor, seed: int) -> torch.Tensor:
    """0-d tensor: median + 1.5·(q3 − q1) of ``scores`` (any shape).

    The q-quantile is the sorted value at index floor(q·(m − 1)) (no interpolation); with more than
    :data:`QUANTILE_SAMPLE` entries, m = QUANTILE_SAMPLE entries drawn with replacement using ``seed``.
    """
    flat = scores.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=gen)
        flat = flat[pick.to(flat.device)]
    m = flat.numel()
    ordered = torch.sort(flat).values
    q1, median, q3 = (ordered[int(q * (m - 1))] for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


def arcee_fusion(group: TensorGroup, shared: Mapping[str, Any],
                 per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ1 where importance >= the Tukey fence, θ0 elsewhere: the base and exactly one other model."""
    b = _base(group)
    if group.n != 2:
        raise ConfigError(f"tensor {group.name!r}: arcee_fusion merges the base and exactly 1 other model, "
                          f"got {group.n - 1} others")
    base, other = group.tensor(b), group.tensor(1 - b)
    x0, x1 = _precise(base), _precise(other)
    if x0.dim() == 0:  # a scalar is a one-entry row
        x0, x1 = x0.reshape(1), x1.reshape(1)
    scores = importance(x1, x0)
    keep = scores >= tukey_fence(scores, group.seed)
    return _emit(group, torch.where(keep, x1, x0).reshape(base.shape).to(base.dtype))
