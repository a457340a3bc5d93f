"""Merges on the hypersphere (mergekit 0.1.5's ``karcher``, ``nuslerp`` and ``multislerp``).

Each treats a tensor (or a task vector, when the plan has a base) as a point: its direction on the unit sphere
and its norm are merged separately — the directions by a spherical mean, the norms by a weighted average.
All three compute in float64 and round once. Semantics: ``METHODS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.ops import TensorGroup, _emit, _precise

# --------------------------------------------------------------------------------------------- helpers


def _non_base(group: TensorGroup) -> list[int]:
    """Indices of the inputs other than the base (all of them without a base)."""
    return [i for i in range(group.n) if i != group.base_index]


def karcher_mean(points: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10,
                 tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the points' directions, scaled by their weighted mean norm.

    Args:
        points: K flat tensors of shape (D,) in the working dtype.
        weights: K weights; the directions are averaged with the weights of the points whose norm exceeds
            ``tol`` (renormalised to sum 1), the norms with all K weights as given.
        max_iter: Riemannian gradient steps at most.
        tol: a point with norm <= tol has no direction; a step shorter than tol stops the iteration, and a
            point closer than tol radians to the current mean pulls on it no more.

    Returns:
        (D,) tensor: Σ wᵢ‖xᵢ‖ · μ, μ the unit Karcher mean (zeros when no point has a direction).
    """
    if len(points) == 1:
        return points[0]
    norms = [torch.linalg.vector_norm(p) for p in points]  # 0-d tensors: they enter the result
    valid = [i for i, nm in enumerate(norms) if nm.item() > tol]
    if not valid:
        return torch.zeros_like(points[0])
    total = sum(weights[i] for i in valid)
    alphas = [weights[i] / total for i in valid]
    # a zero point has no direction (only reachable with tol < 0): its unit vector is zero
    units = [torch.zeros_like(points[i]) if norms[i].item() == 0 else points[i] / norms[i] for i in valid]
    # Start at the normalised Euclidean mean of the directions (the first direction when they cancel).
    mean = torch.zeros_like(units[0])
    for a, u in zip(alphas, units, strict=True):
        mean.add_(u, alpha=a)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        # Riemannian gradient: the weighted log map of every direction at the current mean,
        # log_μ(u) = θ/sin θ · (u − cos θ · μ) with θ the angle between them.
        tangent = torch.zeros_like(mean)
        for a, u in zip(alphas, units, strict=True):
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if theta.item() < tol:
                continue
            tangent.add_((u - cos * mean) * (a * theta / torch.sin(theta)))
        step = torch.linalg.vector_norm(tangent)
        if step.item() < tol:
            break
        # exponential map: walk a geodesic of length ‖tangent‖ along it
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:  # only re-project; rounding drifts the norm off 1
            mean = mean / unit_norm
    scale = sum(w * nm for w, nm in zip(weights, norms, strict=True))
    return scale * mean


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True,
                    row_wise: bool = False, eps: float = 1e-8) -> torch.Tensor:
    """Slerp between two tensors of shape S, as whole vectors (``flatten``) or vector by vector.

    Unlike :func:`mergesearch.merging.ops.slerp_tensors` the coefficients apply to the raw tensors per vector,
    and the lerp fallback only triggers for (anti)colinear vectors, 1 − cos² <= eps².

    Args:
        t: 0 gives ``v0``, 1 gives ``v1``.
        v0, v1: tensors of shape S in the working dtype.
        flatten: treat each tensor as one vector (mergekit's default).
        row_wise: without ``flatten``, interpolate the vectors along dim 0 (mergekit's ``nuslerp_row_wise``:
            the columns of a matrix); otherwise the vectors along the last dim (its rows).
        eps: colinearity threshold.

    Returns:
        Tensor of shape S.
    """
    shape = v0.shape
    if flatten or v0.dim() == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1): one angle per vector
    colinear = (1 - cos * cos) <= eps * eps
    # A placeholder angle (π/2) on colinear vectors keeps the unused spherical branch finite.
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten and out.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def sphere_barycenter(points: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor | None:
    """Barycentric interpolation on the hypersphere through the tangent space at the weighted mean direction.

    Args:
        points: (K, D) points (flattened tensors or task vectors) in the working dtype.
        weights: (K,) weights (already normalised when the caller wants them to sum to 1).
        eps: added to norms before dividing by them.

    Returns:
        (D,) tensor: exp_μ(Σ wᵢ·Pμ(uᵢ)) · Σ wᵢ‖xᵢ‖, with uᵢ the unit directions, μ their normalised weighted mean
        and Pμ the projection onto μ's tangent space; None when Σ wᵢuᵢ has norm < eps (no mean direction).
    """
    norms = torch.linalg.vector_norm(points, dim=-1, keepdim=True)  # (K, 1)
    units = points / (norms + eps)
    w = weights.unsqueeze(1)  # (K, 1)
    mean = (units * w).sum(dim=0)  # (D,)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm.item() < eps:
        return None
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean  # (K, D), each ⟂ μ
    tangent = (tangents * w).sum(dim=0)
    step = torch.linalg.vector_norm(tangent) + eps  # eps: no 0/0 when all points share one direction
    out = mean * torch.cos(step) + tangent * (torch.sin(step) / step)
    return out * (norms.squeeze(1) * weights).sum()


# --------------------------------------------------------------------------------------------- operators


def karcher(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Karcher mean of all inputs (the base, when listed, is one more input), equal weights."""
    first = group.tensor(0)
    if group.n == 1:
        return _emit(group, first)
    points = [_precise(group.tensor(i)).reshape(-1) for i in range(group.n)]
    out = karcher_mean(points, [1.0 / group.n] * group.n, int(shared["max_iter"]), float(shared["tol"]))
    return _emit(group, out.reshape(first.shape).to(first.dtype))


def nuslerp(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Slerp between the two non-base inputs at t = w₂/(w₁+w₂) (0.5 when the weights sum to ~0), on their task
    vectors when the plan has a base (θ = θ0 + slerp(τ1, τ2)), on the tensors otherwise."""
    idx = _non_base(group)
    if len(idx) != 2:
        raise ConfigError(f"tensor {group.name!r}: nuslerp merges exactly 2 models besides the base, got {len(idx)}")
    w = [float(per_input[i]["weight"]) for i in idx]
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    opts = {"flatten": bool(shared["nuslerp_flatten"]), "row_wise": bool(shared["nuslerp_row_wise"])}
    b = group.base_index
    if b is None:
        first = group.tensor(idx[0])
        out = nuslerp_tensors(t, _precise(first), _precise(group.tensor(idx[1])), **opts)
        return _emit(group, out.to(first.dtype))
    base = group.tensor(b)
    taus = [group.exact_task_vector(i) for i in idx]
    out = _precise(base) + nuslerp_tensors(t, taus[0], taus[1], **opts)
    return _emit(group, out.to(base.dtype))


def multislerp(group: TensorGroup, shared: Mapping[str, Any],
               per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Multi-SLERP of the non-base inputs (of their task vectors, plus the base, when the plan has a base).

    One non-base input is returned as is (mergekit ignores its weight). When the weighted mean direction
    vanishes, two inputs fall back to Σ wᵢxᵢ (linear), more are refused.
    """
    idx = _non_base(group)
    if not idx:
        raise ConfigError(f"tensor {group.name!r}: multislerp needs at least one model besides the base")
    if len(idx) == 1:
        return _emit(group, group.tensor(idx[0]))
    b = group.base_index
    first = group.tensor(idx[0] if b is None else b)
    work = _precise(first).dtype
    if b is None:
        points = torch.stack([_precise(group.tensor(i)).reshape(-1) for i in idx])
    else:
        points = torch.stack([group.exact_task_vector(i).reshape(-1) for i in idx])
    weights = torch.tensor([float(per_input[i]["weight"]) for i in idx], dtype=work, device=points.device)
    if shared["normalize_weights"]:
        total = weights.sum()
        if total.item() == 0:
            raise ConfigError(f"tensor {group.name!r}: multislerp weights sum to zero; set normalize_weights: false "
                              f"or change the weights")
        weights = weights / total
    out = sphere_barycenter(points, weights, float(shared["eps"]))
    if out is None:
        if len(idx) != 2:
            raise ConfigError(f"tensor {group.name!r}: multislerp's weighted mean direction is zero (antipodal "
                              f"inputs whose weights cancel); change the weights")
        out = points[0] * weights[0] + points[1] * weights[1]
    out = out.reshape(first.shape)
    if b is not None:
        out = _precise(first) + out
    return _emit(group, out.to(first.dtype))
