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
        l1_table: optional ``i -> sparsify.l1_by_draw(τi, draws of input i)`` (cached DARE rescale sums).
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
    l1_table: Callable[[int], torch.Tensor] | None = None
    ranks: Callable[[int], torch.Tensor | None] | None = None
    out: torch.Tensor | None = None

    def task_vector(self, i: int) -> torch.Tensor:
        if self.delta is not None:
            return self.delta(i)
        assert self.base_index is not None  # callers check the base policy first
        return self.tensor(i) - self.tensor(self.base_index)

    def magnitude_order(self, i: int) -> sp.MagnitudeOrder | None:
        return self.order(i) if self.order is not None else None

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


def _della(group: TensorGroup, i: int, p: Mapping[str, Any], weight: float, rescale: bool) -> _Input:
    """Input i under DELLA: mask⊙τi (fresh, flat) with coefficient wi·‖τi‖₁/‖mask⊙τi‖₁ (rescale)."""
    tau = group.task_vector(i)
    d, eps = float(p["density"]), float(p["epsilon"])
    if d >= 1:
        return _Input(tau.reshape(-1), weight)
    if d <= 0:
        return _Input(tau.reshape(-1), weight, zero=True)
    sp.check_della(d, eps)
    ranks = group.ranks(i) if group.ranks else None
    ranks = sp.della_rank_norm(tau) if ranks is None else ranks
    draws = group.uniform(i)
    if kernels_usable(tau, tau):
        from mergesearch.merging import kernels

        masked, before, after = kernels.della_mask(tau, draws, ranks, d - eps, 2 * eps)
    else:
        masked = tau * sp.della_mask(tau, d, eps, draws, ranks)
        before, after = tau.abs().sum(dtype=torch.float64).item(), masked.abs().sum(dtype=torch.float64).item()
    return _Input(masked.reshape(-1), weight * sp.l1_rescale_factor(before, after) if rescale else weight)


#: elements per chunk of the fused task-vector loop: its (N, chunk) scratch buffers stay in the last-level cache,
#: so a merge costs one streaming pass over the inputs plus cheap in-cache passes; large enough that the ~5 µs
#: overhead of each of the ~20 tensor ops per chunk stays small.
CHUNK = 1 << 16
_BIG = torch.finfo(torch.float32).max


@dataclass
class _Input:
    """One non-base input of the chunked loop: τ (flat), its keep rule, and its coefficient wi·rescale.

    The keep rule is a magnitude band lo <= |τ| <= hi (a bound None is open) or DARE draws < keep_below.
    For float32 a band is applied with ``hardshrink`` (one op: keeps |τ| > λ with λ the float just below lo),
    which gives the same entries as the comparison and avoids bool kernels (several times slower here).
    """

    tau: torch.Tensor
    coef: float
    band: tuple[float | None, float | None] | None = None
    draws: torch.Tensor | None = None  # int16 uniforms; keep where draws < keep_below
    keep_below: int = 0
    zero: bool = False

    def chunks(self) -> None:
        """Split τ (and draws) into CHUNK-sized views once, and fix the per-chunk op."""
        self.tau_c = self.tau.split(CHUNK)
        self.draws_c = self.draws.split(CHUNK) if self.draws is not None else ()
        lo = self.band[0] if self.band is not None else None
        self.fast_band = self.band is not None and self.tau.dtype == torch.float32
        self.lam = _below(lo) if lo is not None else None

    def kept(self, ci: int, buf: torch.Tensor, scratch: torch.Tensor, fmask: torch.Tensor) -> torch.Tensor:
        """mask⊙τ of chunk ``ci`` (unscaled), in ``buf`` or a view of τ when everything is kept."""
        tau = self.tau_c[ci]
        if self.zero:
            return buf.zero_()
        if self.fast_band:
            hi = self.band[1]  # type: ignore[index]
            if self.lam is None:
                buf.copy_(tau)
            else:
                torch.ops.aten.hardshrink.out(tau, self.lam, out=buf)
            if hi is not None:  # drop |τ| > hi: subtracting those entries is exact (x − x = 0)
                buf.sub_(torch.ops.aten.hardshrink.out(tau, hi, out=scratch))
            return buf
        if self.band is not None:  # other dtypes: compare |τ| in float32, like the thresholds (and mergekit)
            lo, hi = self.band
            a = tau.abs().float()
            buf.copy_(tau)
            if lo is not None:
                buf.mul_(a >= lo)
            if hi is not None:
                buf.mul_(a <= hi)
            return buf
        if self.draws is not None:
            return torch.mul(tau, torch.lt(self.draws_c[ci], self.keep_below, out=fmask), out=buf)
        return tau


def _below(x: float) -> float:
    """The largest float32 below ``x`` (x >= 0): |τ| > _below(lo) ⟺ |τ| >= lo for float32 τ."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-1.0)).item() if x > 0 else -1.0


def _prepare(group: TensorGroup, i: int, p: Mapping[str, Any], flags: TaskVectorFlags, weight: float,
             rescale: bool) -> _Input:
    """The keep rule of input i: thresholds from (cached) magnitude order, or seeded uniform draws."""
    if flags.sparsifier == "della_magprune":
        return _della(group, i, p, weight, rescale)
    tau = group.task_vector(i)
    flat = tau.reshape(-1)
    d = float(p["density"])
    inp = _Input(flat, weight)
    if flags.sparsifier is None or d >= 1 or (flags.sparsifier == "random" and sp.keep_below(d) > 32767):
        return inp  # keeps everything (a DARE mask above 1 − 2^-17 keeps every int16 draw)
    n = flat.numel()
    if d <= 0 or n == 0:
        inp.zero = True
        return inp
    order = group.magnitude_order(i)
    if flags.sparsifier == "magnitude":
        inp.band = (sp.order_value(tau, n - max(1, int(d * n)), order).item(), None)
    elif flags.sparsifier == "magnitude_outliers":
        lo, hi = sp.outliers_band(tau, d, float(p["gamma"]), order)
        inp.zero = lo is None
        inp.band = (None if lo is None else lo.item(), None if hi is None else hi.item())
    else:
        draws = group.uniform(i)
        inp.draws = draws.reshape(-1)
        inp.keep_below = sp.keep_below(d)
        if rescale and flags.rescale_variant == "l1":
            table = group.l1_table(i) if group.l1_table is not None else sp.l1_by_draw(tau, draws)
            before, after = table[-1].item(), table[inp.keep_below + 32768].item()
            if before >= 1e-7 and after >= 1e-7:
                inp.coef = weight * (before / after)
        elif rescale:
            inp.coef = weight / d
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
        div = _plain_divisor(weights, normalize)
        # base + Σ (wi·λ/div)·τi: one streaming pass per input, straight into the destination.
        torch.add(base, group.task_vector(idx[0]), alpha=weights[0] * lam / div, out=out)
        for i, w in zip(idx[1:], weights[1:], strict=True):
            out.add_(group.task_vector(i), alpha=w * lam / div)
        return _emit(group, out)
    inputs = [_prepare(group, i, per_input[i], flags, w, rescale) for i, w in zip(idx, weights, strict=True)]
    _fused_loop(inputs, base, out, weights, lam, normalize, flags.consensus)
    return _emit(group, out)


def _fused_loop(inputs: list[_Input], base: torch.Tensor, out: torch.Tensor, weights: list[float], lam: float,
                normalize: bool, consensus: bool) -> None:
    """out = base + λ·mix(coef_i·kept_i) chunk by chunk; every op writes into a preallocated cache-sized buffer.

    Contiguous float32 CPU tensors go to the compiled one-pass kernel instead (same bits, ~3x faster).

    Sign consensus without sign vectors: with g = [Σ u ≥ 0] (0 counts as +), the agreeing part of each
    u_i = coef_i·kept_i is clamp(u_i, L, H) with (L, H) = (0, BIG) where g else (−BIG, 0) — i.e. relu(u_i) or
    min(u_i, 0), the same values and summation order as mergekit's masked sum, in one op over (N, chunk).
    The divisor Σ wi·[i agrees] is |Σ wi·sign(agreeing u_i)| for positive weights (all agreeing signs are equal).
    """
    if kernels_usable(base, out):
        _kernel_loop(inputs, base, out, weights, lam, normalize, consensus)
        return
    k, n = len(inputs), base.numel()
    c = min(CHUNK, n)
    dt, dev = base.dtype, base.device
    work = torch.empty(k, c, dtype=dt, device=dev)  # u_i of one chunk, (N, chunk)
    scratch, fmask, mixed_buf, lo_buf, hi_buf = (torch.empty(c, dtype=dt, device=dev) for _ in range(5))
    cvec = torch.tensor([inp.coef for inp in inputs], dtype=dt, device=dev).unsqueeze(1)  # (N, 1)
    wvec = torch.tensor(weights, dtype=dt, device=dev).unsqueeze(0)  # (1, N)
    # divisor = Σ wi over agreeing inputs, 0 -> 1. With positive weights a nonzero divisor is >= min wi, and a
    # zero one comes with a zero numerator, so clamping at min wi gives the same quotient in one op.
    positive = min(weights) > 0
    div_nc = _plain_divisor(weights, normalize)
    # Views are made once (split) rather than per chunk: each view op costs as much as a small kernel.
    base_c, out_c = base.reshape(-1).split(CHUNK), out.reshape(-1).split(CHUNK)
    for inp in inputs:
        inp.chunks()
    all_draws = all(inp.draws is not None and not inp.zero for inp in inputs)
    full = (work, work.unbind(0), mixed_buf, scratch, fmask, lo_buf, hi_buf)
    for ci in range(len(base_c)):
        m = base_c[ci].numel()
        if m == c:
            w_, rows, mixed, scr, fm, lo_b, hi_b = full
        else:
            w_ = work[:, :m]
            rows, mixed, scr, fm, lo_b, hi_b = w_.unbind(0), *(b[:m] for b in (mixed_buf, scratch, fmask, lo_buf,
                                                                                 hi_buf))
        if not consensus and all_draws:  # mixed = Σ (coef·τ)·mask in one addcmul per input (no FMA: exact)
            mixed.zero_()
            for inp in inputs:
                torch.lt(inp.draws_c[ci], inp.keep_below, out=fm)
                mixed.addcmul_(inp.tau_c[ci], fm, value=inp.coef)
        else:
            for inp, row in zip(inputs, rows, strict=True):
                kept = inp.kept(ci, row, scr, fm)
                if kept is not row:
                    row.copy_(kept)
            w_.mul_(cvec)
            _sum_rows(rows, mixed)
        if consensus:
            hi = torch.ge(mixed, 0, out=hi_b).mul_(_BIG)
            w_.clamp_(min=torch.sub(hi, _BIG, out=lo_b), max=hi)
            _sum_rows(rows, mixed)
            if normalize:  # w_ is free now: reuse it for the agreement indicators
                if positive:
                    divisor = torch.matmul(wvec, torch.sign(w_, out=w_)).squeeze(0).abs_().clamp_(min=min(weights))
                else:
                    divisor = torch.matmul(wvec, torch.ne(w_, 0, out=w_)).squeeze(0)
                    divisor.add_(torch.eq(divisor, 0, out=fm))
                if lam == 1:  # base + 1·(mixed / divisor) in one op: the same two roundings
                    torch.addcdiv(base_c[ci], mixed, divisor, out=out_c[ci])
                    continue
                mixed.div_(divisor)
        elif normalize:
            mixed.div_(div_nc)
        if lam != 1:
            mixed.mul_(lam)
        torch.add(base_c[ci], mixed, out=out_c[ci])


def kernels_usable(base: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the one-pass kernel takes this merge (contiguous float32 CPU tensors; see ``kernels``)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in (base, out))


def _kernel_loop(inputs: list[_Input], base: torch.Tensor, out: torch.Tensor, weights: list[float], lam: float,
                 normalize: bool, consensus: bool) -> None:
    """:func:`_fused_loop` as one compiled pass: each input's keep rule becomes a band or a draw threshold."""
    from mergesearch.merging import kernels  # numba: imported (and the kernel compiled) on first use

    template = next((inp.draws for inp in inputs if inp.draws is not None and not inp.zero), None)
    lo, hi, keep = [], [], []
    for inp in inputs:
        band = inp.band or (None, None)
        lo.append(math.inf if inp.zero else -1.0 if band[0] is None else band[0])
        hi.append(math.inf if band[1] is None else band[1])
        # inputs without draws of their own read another's: int16 draws are always < 32768, never < -32768
        keep.append(-32768 if inp.zero else inp.keep_below if inp.draws is not None else 32768)
    draws = None if template is None else [inp.draws if inp.draws is not None else template for inp in inputs]
    kernels.fused_merge(base, out, [inp.tau for inp in inputs], draws, lo, hi, keep, [inp.coef for inp in inputs],
                        weights, lam, normalize, consensus, _plain_divisor(weights, normalize))


def _plain_divisor(weights: list[float], normalize: bool) -> float:
    """The divisor without sign consensus: Σ wi when normalising (a sum near 0 becomes 1, as in mergekit), else 1."""
    div = sum(weights) if normalize else 1.0
    return 1.0 if abs(div) < 1e-8 else div


def _sum_rows(rows: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """out = rows[0] + rows[1] + … in that order."""
    if len(rows) == 1:
        out.copy_(rows[0])
        return
    torch.add(rows[0], rows[1], out=out)
    for r in rows[2:]:
        out.add_(r)


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
