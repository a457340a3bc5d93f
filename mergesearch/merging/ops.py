"""Merge operators with mergekit 0.1.5 semantics, and the registry that names them.

Each operator merges one tensor: it receives a :class:`TensorGroup` (the same tensor from every input model,
fetched lazily so a resident merger can hand over cached task vectors instead) plus its resolved parameters,
and returns the merged tensor (or writes it into ``group.out``). Adding an operator is one function plus one
``register(Method(...))`` line; the task-vector family is one generic function driven by a table of flags,
like mergekit's generalized task arithmetic. Semantics: ``/work/shared/METHODS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mergesearch.errors import ConfigError
from mergesearch.merging import sparsify as sp

REQUIRED: Any = object()  # marks a parameter without default


@dataclass
class TensorGroup:
    """One output tensor's inputs. ``tensor(i)`` is input i (shape S), ``delta(i)`` its task vector θi − θ0.

    Attributes:
        name: output tensor name (for messages and seeding).
        n: number of inputs; ``base_index`` is the base's position among them (None: no base).
        seed: seed of the random sparsifiers (input i draws with ``seed + i``).
        draws: optional ``(i, seed) -> int16 draws`` of input i (a cache of :func:`sparsify.uniform_draws`).
        ranks: optional ``i -> della_rank_norm(τi)`` (cached row ranks).
        out: optional destination tensor of shape S (the resident model's parameter).
    """

    name: str
    n: int
    base_index: int | None
    tensor: Callable[[int], torch.Tensor]
    delta: Callable[[int], torch.Tensor] | None = None
    order: Callable[[int], sp.MagnitudeOrder | None] | None = None
    seed: int = 0
    draws: Callable[[int, int], torch.Tensor] | None = None
    ranks: Callable[[int], torch.Tensor | None] | None = None
    out: torch.Tensor | None = None

    def task_vector(self, i: int) -> torch.Tensor:
        if self.delta is not None:
            return self.delta(i)
        assert self.base_index is not None  # callers check the base policy first
        return self.tensor(i) - self.tensor(self.base_index)

    def magnitude_order(self, i: int) -> sp.MagnitudeOrder | None:
        return self.order(i) if self.order is not None else None

    def rng(self, i: int) -> torch.Generator:
        """A generator for input i's random mask, seeded with ``seed + i``."""
        return torch.Generator().manual_seed(self.seed + i)

    def uniform(self, i: int) -> torch.Tensor:
        """Seeded int16 uniform draws for input i's random mask (shape S)."""
        if self.draws is not None:
            return self.draws(i, self.seed + i)
        t = self.tensor(i)
        return sp.uniform_draws(t.shape, self.seed + i).to(t.device)


def group_of(name: str, tensors: Sequence[torch.Tensor], base_index: int | None = None,
             seed: int = 0) -> TensorGroup:
    """A TensorGroup over in-memory tensors (tests, one-off use)."""
    return TensorGroup(name, len(tensors), base_index, tensors.__getitem__, seed=seed)


def _emit(group: TensorGroup, result: torch.Tensor) -> torch.Tensor:
    if group.out is None or result is group.out:
        return result
    group.out.copy_(result)
    return group.out


# --------------------------------------------------------------------------------------------- operators


def linear(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = Σ wi·θi / Σ wi (normalize) or Σ wi·θi; accumulated in fp32 in input order; the base is an input."""
    weights = [float(p["weight"]) for p in per_input]
    denom = sum(weights) if shared["normalize"] else 1.0
    if denom == 0:
        raise ConfigError(f"linear: weights sum to zero for tensor {group.name!r}; set normalize: false")
    first = group.tensor(0)
    work = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = group.out if group.out is not None and group.out.dtype == work else None
    # Folding 1/Σw into the coefficients saves a pass; the difference to dividing at the end is ~1 ulp.
    res = torch.mul(first.to(work), weights[0] / denom, out=out) if out is not None else first.to(work) * (
        weights[0] / denom)
    for i in range(1, group.n):
        res.add_(group.tensor(i).to(work), alpha=weights[i] / denom)
    return _emit(group, res.to(first.dtype))


def passthrough(group: TensorGroup, shared: Mapping[str, Any],
                per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Copy the single input, optionally multiplied by its ``scale``."""
    t = group.tensor(0)
    scale = per_input[0].get("scale")
    return _emit(group, t if scale is None else t * float(scale))


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995,
                  eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (flattened), lerp when nearly colinear.

    Args:
        t: 0 gives ``a`` (the base), 1 gives ``b``.
        a, b: tensors of one shape S.

    Returns:
        Tensor of shape S in ``a``'s dtype (computed in fp32, or fp64 for fp64 inputs).
    """
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(work), b.reshape(-1).to(work)
    na, nb = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((x / na) * (y / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = torch.acos(dot)
        ca = torch.sin((1 - t) * theta) / torch.sin(theta)
        cb = torch.sin(t * theta) / torch.sin(theta)
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


def slerp(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """SLERP between the base (t = 0) and the other input (t = 1)."""
    if group.n == 1:
        return _emit(group, group.tensor(0))
    b = group.base_index
    assert b is not None
    return _emit(group, slerp_tensors(float(shared["t"]), group.tensor(b), group.tensor(1 - b)))


def model_stock(group: TensorGroup, shared: Mapping[str, Any],
                per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Model Stock: t = N·cosφ / (1 + (N−1)·cosφ), θ = t·mean(θi) + (1−t)·θ0 (per row with filter_wise)."""
    b = group.base_index
    assert b is not None
    w0 = group.tensor(b)
    ws = [group.tensor(i) for i in range(group.n) if i != b]
    shape = w0.shape
    if shared["filter_wise"]:
        if w0.dim() == 1:  # a bias is one row
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norm = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cos.append(((oa * ob).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos_t
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_t), n * cos_t / torch.where(singular, torch.ones_like(den), den))
    return _emit(group, (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape))


@dataclass(frozen=True)
class TaskVectorFlags:
    """Switches of the generalized task-arithmetic pipeline (METHODS.md table)."""

    sparsifier: str | None
    consensus: bool
    normalize: bool
    rescale: bool
    rescale_variant: Literal["l1", "inverse_density"] = "l1"


def _sparsified(group: TensorGroup, i: int, p: Mapping[str, Any], flags: TaskVectorFlags,
                rescale: bool) -> torch.Tensor:
    """τi after a DELLA mask (and rescale), shape S — the one sparsifier applied to whole tensors."""
    tau = group.task_vector(i)
    d = float(p["density"])
    mask = sp.della_mask(tau, d, float(p["epsilon"]), group.rng(i), group.ranks(i) if group.ranks else None)
    if mask is None:
        return tau
    masked = tau * mask
    if not rescale:
        return masked
    if flags.rescale_variant == "inverse_density":
        return masked / d if d > 0 else masked
    return masked * sp.l1_rescale_factor(tau, masked)


#: elements per chunk of the fused task-vector loop: its scratch buffers stay in cache, so a merge costs a few
#: streaming passes over the inputs instead of one pass per elementwise operation.
CHUNK = 1 << 16


@dataclass
class _Input:
    """One non-base input of the chunked loop: τ (flat), its keep rule, and its coefficient wi·rescale."""

    tau: torch.Tensor
    coef: float
    band: tuple[torch.Tensor | None, torch.Tensor | None] | None = None  # keep lo <= |τ| <= hi
    draws: torch.Tensor | None = None  # int16 uniforms; keep where draws < keep_below
    keep_below: int = 0
    zero: bool = False

    def kept(self, s: int, e: int, buf: torch.Tensor, absbuf: torch.Tensor, fmask: torch.Tensor) -> None:
        """Write coef·mask·τ[s:e] into buf. Masks are float 0/1: bool kernels are several times slower here."""
        tau = self.tau[s:e]
        if self.zero:
            buf.zero_()
            return
        torch.mul(tau, self.coef, out=buf)
        if self.band is not None:
            lo, hi = self.band
            torch.abs(tau, out=absbuf)
            if lo is not None:
                buf.mul_(torch.ge(absbuf, lo, out=fmask))
            if hi is not None:
                buf.mul_(torch.le(absbuf, hi, out=fmask))
        if self.draws is not None:
            buf.mul_(torch.lt(self.draws[s:e], self.keep_below, out=fmask))

    def kept_l1(self) -> float:
        """‖mask⊙τ‖₁, accumulated chunk by chunk in float64."""
        n = self.tau.numel()
        buf, a, m = (torch.empty(min(CHUNK, n), dtype=self.tau.dtype, device=self.tau.device) for _ in range(3))
        coef, self.coef = self.coef, 1.0
        total = torch.zeros((), dtype=torch.float64, device=self.tau.device)  # no host sync per chunk
        for s in range(0, n, CHUNK):
            e = min(n, s + CHUNK)
            self.kept(s, e, buf[: e - s], a[: e - s], m[: e - s])
            total += buf[: e - s].abs().sum(dtype=torch.float64)
        self.coef = coef
        return total.item()


def _prepare(group: TensorGroup, i: int, p: Mapping[str, Any], flags: TaskVectorFlags, weight: float,
             rescale: bool) -> _Input:
    """The keep rule of input i: thresholds from (cached) magnitude order, or seeded uniform draws."""
    if flags.sparsifier == "della_magprune":
        return _Input(_sparsified(group, i, p, flags, rescale).reshape(-1), weight)
    tau = group.task_vector(i)
    flat = tau.reshape(-1)
    d = float(p["density"])
    inp = _Input(flat, weight)
    if flags.sparsifier is None or d >= 1:
        return inp
    n = flat.numel()
    if d <= 0 or n == 0:
        inp.zero = True
        return inp
    order = group.magnitude_order(i)
    if flags.sparsifier == "magnitude":
        inp.band = (sp.order_value(tau, n - max(1, int(d * n)), order), None)
    elif flags.sparsifier == "magnitude_outliers":
        lo, hi = sp.outliers_band(tau, d, float(p["gamma"]), order)
        inp.zero = lo is None
        inp.band = (lo, hi)
    else:
        inp.draws = group.uniform(i).reshape(-1)
        inp.keep_below = sp.keep_below(d)
    if rescale and not inp.zero:
        if flags.rescale_variant == "inverse_density":
            inp.coef = weight / d
        else:
            before = flat.abs().sum(dtype=torch.float64).item()
            after = inp.kept_l1()
            if before >= 1e-7 and after >= 1e-7:
                inp.coef = weight * (before / after)
    return inp


def task_vector_merge(flags: TaskVectorFlags, group: TensorGroup, shared: Mapping[str, Any],
                      per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = θ0 + λ·mix(wi · sparsify(τi)) — the pipeline of METHODS.md, steps 1–6.

    Runs as one fused loop over chunks of the flattened tensor. ``int8_mask`` only changes the dtype of
    mergekit's sign mask, never the result, so it is accepted and unused.
    """
    b = group.base_index
    assert b is not None
    base = group.tensor(b)
    idx = [i for i in range(group.n) if i != b]
    if not idx:
        return _emit(group, base)
    weights = [float(per_input[i]["weight"]) for i in idx]
    lam = float(shared["lambda"])
    rescale = bool(shared["rescale"])
    normalize = bool(shared["normalize"])
    out = group.out if group.out is not None and group.out.dtype == base.dtype else torch.empty_like(base)
    if flags.sparsifier is None and not flags.consensus:
        div = sum(weights) if normalize else 1.0
        div = 1.0 if abs(div) < 1e-8 else div
        # base + Σ (wi·λ/div)·τi: one streaming pass per input, straight into the destination.
        torch.add(base, group.task_vector(idx[0]), alpha=weights[0] * lam / div, out=out)
        for i, w in zip(idx[1:], weights[1:], strict=True):
            out.add_(group.task_vector(i), alpha=w * lam / div)
        return _emit(group, out)
    inputs = [_prepare(group, i, per_input[i], flags, w, rescale) for i, w in zip(idx, weights, strict=True)]
    k, n = len(inputs), base.numel()
    c = min(CHUNK, n)
    dt = base.dtype
    dev = base.device
    work, tmp, agree = (torch.empty(k, c, dtype=dt, device=dev) for _ in range(3))  # (N, chunk) scratch, stays in cache
    absbuf, fmask, mixed_buf, sign_buf, zero_buf = (torch.empty(c, dtype=dt, device=dev) for _ in range(5))
    wvec = torch.tensor(weights, dtype=dt, device=dev).unsqueeze(0)  # (1, N)
    div_nc = sum(weights) if normalize else 1.0
    div_nc = 1.0 if abs(div_nc) < 1e-8 else div_nc
    base_f, out_f = base.reshape(-1), out.reshape(-1)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        m = e - s
        w_, t_, mixed = work[:, :m], tmp[:, :m], mixed_buf[:m]
        for j, inp in enumerate(inputs):
            inp.kept(s, e, w_[j], absbuf[:m], fmask[:m])
        torch.add(w_[0], w_[1], out=mixed) if k > 1 else mixed.copy_(w_[0])
        for j in range(2, k):
            mixed.add_(w_[j])
        if flags.consensus:
            sgn = torch.ge(mixed, 0, out=sign_buf[:m]).mul_(2).sub_(1)  # majority sign of Σ wi·τi; 0 counts +
            torch.mul(w_, sgn, out=t_)  # > 0 exactly where an input agrees; pruned zeros never do
            if normalize:
                a_ = torch.gt(t_, 0, out=agree[:, :m])
            t_.clamp_(min=0)
            # Σ of agreeing entries = sign · Σ of their magnitudes (negation is exact, order kept).
            torch.add(t_[0], t_[1], out=mixed) if k > 1 else mixed.copy_(t_[0])
            for j in range(2, k):
                mixed.add_(t_[j])
            mixed.mul_(sgn)
            if normalize:  # divisor = Σ wi over agreeing inputs (0 -> 1)
                divisor = torch.matmul(wvec, a_).squeeze(0)
                divisor.add_(torch.eq(divisor, 0, out=zero_buf[:m]))
                mixed.div_(divisor)
        elif normalize:
            mixed.div_(div_nc)
        if lam != 1:
            mixed.mul_(lam)
        torch.add(base_f[s:e], mixed, out=out_f[s:e])
    return _emit(group, out)


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function, parameters with defaults, and input contract.

    ``per_input`` parameters of ``non_base`` methods are resolved for the non-base inputs only.
    """

    name: str
    merge: Callable[[TensorGroup, Mapping[str, Any], Sequence[Mapping[str, Any]]], torch.Tensor]
    shared: Mapping[str, Any] = field(default_factory=dict)
    per_input: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = False
    non_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``; ConfigError naming the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown merge_method {name!r} (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]


def _task_vector_method(name: str, flags: TaskVectorFlags) -> Method:
    per_input: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if flags.sparsifier == "magnitude_outliers":
        per_input["gamma"] = 0.01
    if flags.sparsifier == "della_magprune":
        per_input["epsilon"] = 0.15

    def merge(group: TensorGroup, shared: Mapping[str, Any], per: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        return task_vector_merge(flags, group, shared, per)

    shared = {"int8_mask": False, "normalize": flags.normalize, "rescale": flags.rescale, "lambda": 1.0}
    return Method(name, merge, shared, per_input, needs_base=True, non_base=True)


#: name -> (sparsifier, consensus, normalize default, rescale default[, rescale variant])
TASK_VECTOR_METHODS: dict[str, TaskVectorFlags] = {
    "task_arithmetic": TaskVectorFlags(None, False, False, False),
    "ties": TaskVectorFlags("magnitude", True, True, False),
    "dare_linear": TaskVectorFlags("random", False, False, True),
    "dare_ties": TaskVectorFlags("random", True, False, True),
    "dare_linear_invdensity": TaskVectorFlags("random", False, False, True, "inverse_density"),
    "dare_ties_invdensity": TaskVectorFlags("random", True, False, True, "inverse_density"),
    "breadcrumbs": TaskVectorFlags("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": TaskVectorFlags("magnitude_outliers", True, False, False),
    "della": TaskVectorFlags("della_magprune", True, True, True),
    "della_linear": TaskVectorFlags("della_magprune", False, False, True),
}

register(Method("linear", linear, shared={"normalize": True}, per_input={"weight": REQUIRED}))
register(Method("passthrough", passthrough, per_input={"scale": None}, max_inputs=1))
register(Method("slerp", slerp, shared={"t": REQUIRED}, needs_base=True, min_inputs=2, max_inputs=2))
register(Method("model_stock", model_stock, shared={"filter_wise": False}, needs_base=True, min_inputs=3))
for _name, _flags in TASK_VECTOR_METHODS.items():
    register(_task_vector_method(_name, _flags))
#: methods whose result depends on the random seed
RANDOM_METHODS = frozenset(n for n, f in TASK_VECTOR_METHODS.items() if f.sparsifier in ("random", "della_magprune"))


def check_number(name: str, value: Any, where: str) -> float:
    """A finite float, or ConfigError naming the parameter and where it was set."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"parameter {name!r} = {value!r} for {where} must be a finite number")
    return float(value)
