"""Test-side helpers: run any registered method on in-memory tensors, and an independent float64 reference of
the task-vector pipeline written straight from METHODS.md (no chunks, no kernels, no caches)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergesearch.merging import sparsify as sp
from mergesearch.merging.methods import REQUIRED, TaskVectorFlags, get_method
from mergesearch.merging.ops import group_of

#: values of required parameters in tests
FILL = {"weight": (0.6, 1.3, 0.4, 0.9), "t": 0.4}


def params_for(method: str, n_experts: int, per: Mapping[str, Any] | None = None,
               shared: Mapping[str, Any] | None = None, base: bool = True
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resolved (shared, per-input) parameters of ``method``: defaults, fills for required ones, overrides."""
    m = get_method(method)
    sh = {k: (FILL[k] if p.default is REQUIRED else p.default) for k, p in m.shared.items()}
    sh.update(shared or {})
    rows: list[dict[str, Any]] = [{}] if base and m.non_base else []
    for i in range(n_experts + (1 if base and not m.non_base else 0)):
        row = {}
        for k, p in m.per_input.items():
            if p.default is REQUIRED:
                fill = FILL[k]
                row[k] = fill[i % len(fill)] if isinstance(fill, tuple) else fill
            elif p.default is not None:
                row[k] = p.default
        row.update(per or {})
        rows.append(row)
    return sh, rows


def run(method: str, base: torch.Tensor, taus: Sequence[torch.Tensor], *, per: Mapping[str, Any] | None = None,
        per_list: Sequence[Mapping[str, Any]] | None = None, shared: Mapping[str, Any] | None = None,
        seed: int = 7, dtype: torch.dtype | None = None, device: str = "cpu",
        experts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """``method`` over [base, θ1, …] (the base at index 0 when the method uses it), with τi handed over exactly
    as given (like the resident merger's cached task vectors). θi defaults to base + τi; tensors are cast to
    ``dtype`` and moved to ``device`` first."""
    dt = dtype or base.dtype
    b = base.to(dt).to(device)
    ts = [t.to(dt).to(device) for t in taus]
    thetas = [e.to(dt).to(device) for e in experts] if experts is not None else [b + t for t in ts]
    m = get_method(method)
    uses_base = m.needs_base or m.non_base
    tensors = [b, *thetas] if uses_base else thetas
    sh, rows = params_for(method, len(ts), per, shared, base=uses_base)
    if per_list is not None:
        off = 1 if uses_base else 0
        for i, extra in enumerate(per_list):
            rows[off + i].update(extra)
    group = group_of("model.layers.0.mlp.up_proj.weight", tensors, 0 if uses_base else None, seed)
    group.method = method
    if uses_base:
        group.delta = lambda i: ts[i - 1]
    return m.merge(group, sh, rows)


def reference_task_vector(method: str, base: torch.Tensor, taus: Sequence[torch.Tensor],
                          shared: Mapping[str, Any], per: Sequence[Mapping[str, Any]], seed: int,
                          margin: bool = False) -> torch.Tensor:
    """METHODS.md steps 1–6 in float64, masks computed from scratch (the random draws are the RNG's definition).

    With ``margin``: |Σ u| of the sign election instead (inf without consensus), to tell sign ties apart.
    """
    flags: TaskVectorFlags = get_method(method).options["flags"]
    base64 = base.double()
    us, ws = [], []
    for i, (tau, p) in enumerate(zip(taus, per[1:], strict=True), start=1):
        t = tau.double()
        w, d = float(p["weight"]), float(p.get("density", 1.0))
        mask = _mask(flags, t, d, p, seed + i)
        kept = t * mask
        coef = w
        if shared["rescale"] and mask is not True and 0 < d < 1:
            if flags.rescale_variant == "inverse_density":
                coef = w / d
            else:
                before, after = t.abs().sum().item(), kept.abs().sum().item()
                coef = w * (before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
        us.append(coef * kept)
        ws.append(w)
    u = torch.stack(us)
    if margin:
        return u.sum(0).abs() if flags.consensus else torch.full_like(base64, float("inf"))
    if flags.consensus:
        sign = torch.where(u.sum(0) >= 0, 1.0, -1.0).double()
        agree = (u * sign) > 0
        mixed = (u * agree).sum(0)
        div = (torch.tensor(ws, dtype=torch.float64).view(-1, *[1] * base.dim()) * agree).sum(0)
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed = u.sum(0)
        div = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
    if shared["normalize"]:
        mixed = mixed / div
    return base64 + float(shared["lambda"]) * mixed


def _mask(flags: TaskVectorFlags, t: torch.Tensor, d: float, p: Mapping[str, Any], seed: int) -> Any:
    n = t.numel()
    a = t.abs().reshape(-1)
    if flags.sparsifier is None or d >= 1:
        return True
    if d <= 0:
        return torch.zeros_like(t)
    if flags.sparsifier == "magnitude":
        k = max(1, int(d * n))
        thr = a.sort().values[n - k]
        return (t.abs() >= thr).double()
    if flags.sparsifier == "magnitude_outliers":
        target, n_top = int(d * n), int(float(p["gamma"]) * n)
        if target <= 0:
            return torch.zeros_like(t)
        s = a.sort().values
        n_bot = max(0, n - target - n_top)
        lo, hi_rank = s[n_bot], n_bot + target - 1
        keep = t.abs() >= lo
        if hi_rank < n - 1:
            keep &= t.abs() <= s[hi_rank]
        return keep.double()
    draws = sp.uniform_draws(t.shape, seed)
    if flags.sparsifier == "random":
        if sp.keep_below(d) > 32767:
            return True
        return (draws < sp.keep_below(d)).double()
    eps = float(p["epsilon"])
    rank = t.abs().reshape(t.shape[0], -1).argsort(1).argsort(1).double() / (t.reshape(t.shape[0], -1).shape[1] - 1)
    prob = (torch.tensor(d - eps, dtype=torch.float32) + rank.float().reshape(t.shape) * torch.tensor(2 * eps,
                                                                                                    dtype=torch.float32))
    return ((draws.float() + 32768) < prob * 65536).double()
