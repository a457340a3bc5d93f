"""Merge operators with mergekit 0.1.5 semantics (the table naming them is :mod:`mergesearch.merging.methods`).

Each operator merges one tensor: it receives a :class:`TensorGroup` (the same tensor from every input model,
fetched lazily so a resident merger can hand over cached task vectors instead) plus its resolved parameters,
and returns the merged tensor (or writes it into ``group.out``). The task-vector family is one generic function
driven by a table of flags, like mergekit's generalized task arithmetic. Every operator computes in float32 (or
float64 for float64 inputs) and rounds once into the inputs' dtype. Semantics: ``/work/shared/METHODS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergesearch.errors import ConfigError, NonFiniteError
from mergesearch.merging import sparsify as sp
from mergesearch.merging.methods import TaskVectorFlags
from mergesearch.merging.threads import kernel_threads
from mergesearch.models import all_finite


@dataclass
class TensorGroup:
    """One output tensor's inputs. ``tensor(i)`` is input i (shape S), ``delta(i)`` its task vector θi − θ0.

    Attributes:
        name: output tensor name (for messages and seeding).
        n: number of inputs; ``base_index`` is the base's position among them (None: no base).
        seed: seed of the random sparsifiers (input i draws with ``seed + i``).
        draws: optional ``(i, seed) -> int16 draws`` of input i (a cache of :func:`sparsify.uniform_draws`).
        l1_table: optional ``i -> sparsify.l1_by_draw(τi, draws of input i)`` (cached DARE rescale sums).
        ranks: optional ``i -> della_ranks(τi)`` (cached compact row ranks).
        out: optional destination tensor of shape S (the resident model's parameter).
        method: the method's name (for messages).
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
    method: str = ""

    def task_vector(self, i: int) -> torch.Tensor:
        if self.delta is not None:
            return self.delta(i)
        return self.tensor(i) - self.tensor(_base(self))

    def exact_task_vector(self, i: int) -> torch.Tensor:
        """τi in float64 from the tensors (exact: no rounding to the job's dtype as the cached τ has)."""
        return _precise(self.tensor(i)) - _precise(self.tensor(_base(self)))

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


def _emit(group: TensorGroup, result: torch.Tensor, bad: int | None = None) -> torch.Tensor:
    """Hand the result over (into ``group.out`` when given), refusing a non-finite one.

    Args:
        bad: the non-finite count when the operator counted it while writing (the kernel does); else the
            finished tensor is checked here.

    Raises:
        NonFiniteError: naming the tensor and the method.
    """
    if group.out is not None and result is not group.out:
        if group.out.dtype != result.dtype:  # a narrower destination may overflow what was finite: check it
            bad = None
        group.out.copy_(result)
        result = group.out
    if bad is None and result.is_floating_point():
        # one reduction without a tensor-sized temporary (min/max propagate NaN and inf); count only then
        bad = 0 if all_finite(result) else int(result.numel() - torch.isfinite(result).sum().item())
    if bad:
        raise NonFiniteError(f"merged tensor {group.name!r} (method {group.method or '?'}) has {bad} non-finite "
                             f"entries (NaN/inf): check its weights and inputs")
    return result


def _dest(group: TensorGroup, like: torch.Tensor) -> torch.Tensor:
    """Where an operator writes: ``group.out`` when it has ``like``'s dtype and is contiguous, else a new contiguous
    tensor (the chunked passes write through flat views, which a strided tensor's ``reshape`` would copy)."""
    out = group.out
    if out is not None and out.dtype == like.dtype and out.is_contiguous():
        return out
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _base(group: TensorGroup) -> int:
    """The base's input index (resolve checks ``needs_base`` before any operator runs)."""
    if group.base_index is None:
        raise ConfigError(f"tensor {group.name!r}: method {group.method or '?'} needs the base model among its inputs")
    return group.base_index


def _work(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the working precision: float32, or float64 for float64 inputs."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _precise(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64, the precision of the operators off the search's hot path (spherical, selection and
    swap methods): computed from exact inputs and rounded once, a result is never further from the exact one than
    mergekit's float32 arithmetic plus one unit in the last place, even where a selection (top-k, a quantile,
    a threshold) or a cancellation would turn float32 rounding into a large difference."""
    return t.double()


# --------------------------------------------------------------------------------------------- operators


def linear(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """θ = Σ wi·θi / Σ wi (normalize) or Σ wi·θi; the base is an input.

    Summed in float64 in input order (each wi·θi of float32 θi is exact there), divided, then rounded once
    (through float32, as the kernel stores); half-precision θi in float32 (wi rounded to it), 1.7x faster in the
    kernel and, with 13–16 bits to spare, the correctly rounded result or its neighbour unless the sum cancels
    (mergekit sums in the half dtype itself). Contiguous CPU inputs take one compiled pass
    (:func:`kernels.fused_merge` without a base), others torch ops in the same order (same bits).
    """
    weights = [float(p["weight"]) for p in per_input]
    denom = sum(weights) if shared["normalize"] else 1.0
    if denom == 0:
        raise ConfigError(f"linear: weights sum to zero for tensor {group.name!r}; set normalize: false")
    tensors = [group.tensor(i) for i in range(group.n)]
    first = tensors[0]
    out = _dest(group, first)
    if len({t.dtype for t in tensors}) == 1 and _kernel_usable(first, out) and all(t.is_contiguous() for t in tensors):
        from mergesearch.merging import kernels

        bad = kernels.fused_merge(None, out, tensors, [1.0] * len(tensors), weights, 1.0,
                                  False, False, denom, threads=kernel_threads())
        return _emit(group, out, bad)
    half = first.dtype in (torch.bfloat16, torch.float16)
    res = torch.zeros(first.shape, dtype=torch.float32 if half else torch.float64, device=first.device)
    for t, w in zip(tensors, weights, strict=True):
        res.add_(t.float() * w if half else _precise(t) * w)
    res.div_(denom)
    return _emit(group, out.copy_(res))


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
        Tensor of shape S in ``a``'s dtype (computed in float64, rounded once).
    """
    x, y = _precise(a.reshape(-1)), _precise(b.reshape(-1))
    na, nb = torch.linalg.vector_norm(x).item(), torch.linalg.vector_norm(y).item()
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = min(1.0, max(-1.0, (torch.dot(x, y) / (na * nb)).item()))
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


def slerp(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """SLERP between the base (t = 0) and the other input (t = 1)."""
    if group.n == 1:
        return _emit(group, group.tensor(0))
    b = _base(group)
    return _emit(group, slerp_tensors(float(shared["t"]), group.tensor(b), group.tensor(1 - b)))


def model_stock(group: TensorGroup, shared: Mapping[str, Any],
                per_input: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Model Stock: t = N·cosφ / (1 + (N−1)·cosφ), θ = t·mean(θi) + (1−t)·θ0 (per row with filter_wise)."""
    b = _base(group)
    dtype = group.tensor(b).dtype
    w0 = _work(group.tensor(b))
    ws = [_work(group.tensor(i)) for i in range(group.n) if i != b]
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
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # work dtype: float32 (float64 inputs stay)
    n = len(ws)
    den = 1 + (n - 1) * cos_t
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_t), n * cos_t / torch.where(singular, torch.ones_like(den), den))
    return _emit(group, (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape).to(dtype))




# ------------------------------------------------------------------------------- the task-vector pipeline

#: elements per chunk of the torch path: its (N, chunk) float32 scratch buffers stay in the last-level cache, so
#: a merge costs one streaming pass over the inputs plus cheap in-cache passes; large enough that the ~5 µs
#: overhead of each of the ~20 tensor ops per chunk stays small.
CHUNK = 1 << 16
#: dtypes the compiled CPU kernel reads and writes (computing in float32 either way)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Della:
    """DELLA's keep rule (:func:`sparsify.della_mask`): keep with a probability from density − ε (smallest |τ| of
    a row) to density + ε (largest), by the row ranks."""

    ranks: torch.Tensor  # compact row ranks, τ's shape (sparsify.della_ranks)
    density: float
    epsilon: float


@dataclass
class _Input:
    """One non-base input: τ (shape S: flattening it is a torch call per input, and the kernel takes any shape),
    its keep rule, and its coefficient wi·rescale.

    The keep rule is a magnitude band lo <= |τ| <= hi (a bound None is open), or DARE draws < keep_below,
    or DELLA's (``della``, with ``draws``), or everything (none), or nothing (``zero``).
    """

    tau: torch.Tensor
    coef: float
    band: tuple[float | None, float | None] | None = None
    draws: torch.Tensor | None = None  # int16 uniforms or DELLA's int8 drop flags; keep where draws < keep_below
    keep_below: int = 0
    zero: bool = False
    della: _Della | None = None
    #: DELLA's pass, still to run: () -> (int8 drop flags, ‖τ‖₁, ‖mask⊙τ‖₁); see :func:`_run_pending`
    pending: Callable[[], tuple[torch.Tensor, float, float]] | None = None


def _prepare(group: TensorGroup, i: int, p: Mapping[str, Any], flags: TaskVectorFlags, weight: float,
             rescale: bool) -> _Input:
    """Input i's keep rule (thresholds from the cached magnitude order, or seeded draws) and coefficient.

    With ``rescale`` every sparsifier scales the kept entries by ‖τ‖₁/‖mask⊙τ‖₁ (mergekit's L1 matching;
    1/d for the ``inverse_density`` variant); keeping everything never rescales.
    """
    tau = group.task_vector(i)
    d = float(p.get("density", 1.0))
    kind = flags.sparsifier
    if kind is None or d >= 1 or (kind == "random" and sp.keep_below(d) > 32767):
        return _Input(tau, weight)  # keeps everything (a DARE mask above 1 − 2^-17 keeps every int16 draw)
    n = tau.numel()
    if d <= 0 or n == 0:
        return _Input(tau, weight, zero=True)
    if kind == "della_magprune":
        return _della(group, i, tau, d, float(p["epsilon"]), weight, rescale)
    inp = _Input(tau, weight)
    if kind == "random":
        draws = group.uniform(i)
        inp.draws, inp.keep_below = draws, sp.keep_below(d)
        if rescale and flags.rescale_variant == "l1":
            table = group.l1_table(i) if group.l1_table is not None else sp.l1_by_draw(tau, draws)
            inp.coef = weight * sp.l1_rescale_factor(table[-1].item(), table[inp.keep_below + 32768].item())
    else:
        order = group.magnitude_order(i)  # built on first use: a counting pass over τ
        if kind == "magnitude":
            lo, hi = sp.order_value(tau, n - max(1, int(d * n)), order), None
        else:
            lo, hi = sp.outliers_band(tau, d, float(p["gamma"]), order)
            if lo is None:
                inp.zero = True
                return inp
        inp.band = (lo.item(), None if hi is None else hi.item())
        if rescale and flags.rescale_variant == "l1":
            inp.coef = weight * sp.l1_rescale_factor(*sp.band_l1(tau, *inp.band))
    if rescale and flags.rescale_variant == "inverse_density":
        inp.coef = weight / d
    return inp


def _della(group: TensorGroup, i: int, tau: torch.Tensor, d: float, eps: float, weight: float,
           rescale: bool) -> _Input:
    """Input i under DELLA: τi with its keep rule (draws and cached row ranks) and coefficient wi, times
    ‖τi‖₁/‖mask⊙τi‖₁ once the pending L1 pass has run (rescale)."""
    sp.check_della(d, eps)
    ranks = group.ranks(i) if group.ranks else None
    ranks = sp.della_ranks(tau) if ranks is None else ranks
    draws = group.uniform(i)
    inp = _Input(tau, weight, draws=draws, della=_Della(ranks, d, eps))
    if rescale:
        inp.pending = lambda: _della_pass(inp, tau, "dropped")
    return inp


def _della_pass(inp: _Input, tau: torch.Tensor,
                into: Literal["masked", "dropped"]) -> tuple[torch.Tensor, float, float]:
    """(mask⊙τ as float32 of τ's shape (``into="masked"``) or int8 flags of numel(τ), 1 where dropped
    (``"dropped"``); ‖τ‖₁; ‖mask⊙τ‖₁) of a DELLA input: one compiled pass on the CPU
    (:func:`kernels.della_mask`), torch ops elsewhere."""
    rule = inp.della
    if tau.device.type == "cpu" and tau.is_contiguous() and tau.dtype in _KERNEL_DTYPES:
        from mergesearch.merging import kernels

        return kernels.della_mask(tau, inp.draws, rule.ranks, rule.density - rule.epsilon, 2 * rule.epsilon,
                                  into=into)
    t = _work(tau)
    mask = sp.della_mask(tau, rule.density, rule.epsilon, inp.draws.reshape(tau.shape), sp.rank_norm(rule.ranks))
    masked = t * mask
    kept = masked if into == "masked" else (~mask).to(torch.int8).reshape(-1)
    return kept, t.abs().sum(dtype=torch.float64).item(), masked.abs().sum(dtype=torch.float64).item()


def task_vector_merge(group: TensorGroup, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]], *,
                      flags: TaskVectorFlags) -> torch.Tensor:
    """θ = θ0 + λ·mix(wi · sparsify(τi)) — the pipeline of METHODS.md, steps 1–6, in one fused pass.

    Contiguous CPU tensors take the compiled kernel (:mod:`mergesearch.merging.kernels`), anything else (CUDA,
    float64) the chunked torch loop :func:`_torch_merge`; both compute in float32 (float64 for float64 inputs)
    in the same order and round once, so they give the same bits. ``int8_mask`` only changes the dtype of
    mergekit's sign mask, never the result, so it is accepted and unused.

    Raises:
        NonFiniteError: the result holds NaN/inf (counted while writing it).
    """
    b = _base(group)
    base = group.tensor(b)
    idx = [i for i in range(group.n) if i != b]
    if not idx:
        return _emit(group, base)
    weights = [float(per_input[i]["weight"]) for i in idx]
    lam, rescale, normalize = float(shared["lambda"]), bool(shared["rescale"]), bool(shared["normalize"])
    inputs = [_prepare(group, i, per_input[i], flags, w, rescale) for i, w in zip(idx, weights, strict=True)]
    out = _dest(group, base)
    div_nc = _plain_divisor(weights, normalize)
    run = _kernel_merge if _kernel_usable(base, out) else _torch_merge
    if run is _torch_merge:  # the torch path takes DELLA's mask as a multiplied τ, its norms from the same pass
        for inp in (x for x in inputs if x.della is not None):
            masked, before, after = _della_pass(inp, inp.tau.reshape(inp.della.ranks.shape), "masked")
            if inp.pending is not None:
                inp.coef *= sp.l1_rescale_factor(before, after)
            inp.tau, inp.della, inp.draws, inp.pending = masked, None, None, None
    _run_pending(inputs)
    bad = run(inputs, base, out, weights, lam, normalize, flags.consensus, div_nc)
    return _emit(group, out, bad)


def _run_pending(inputs: list[_Input]) -> None:
    """Run the inputs' pending DELLA passes, side by side on ``kernel_threads()`` threads, rescale, and hand each
    input's draw test to the merge as drop flags (DARE's rule, kept below 1).

    Each pass is one thread's work (its L1 sums have a fixed order, which a split would change), so the inputs
    are what is spread over threads: each result is the same as run alone. The pass makes the keep test
    anyway, so the merge reads its 1-byte flags instead of testing again on the draws and ranks (4 bytes an
    entry): same bits, bfloat16 della 1.3x faster (3 inputs of 16M entries, one thread).
    """
    todo = [inp for inp in inputs if inp.pending is not None]
    if not todo:
        return
    from mergesearch.merging import kernels

    for inp, (dropped, before, after) in zip(todo, kernels.run_side_by_side([inp.pending for inp in todo]),
                                             strict=True):
        inp.coef *= sp.l1_rescale_factor(before, after)
        inp.draws, inp.keep_below, inp.della, inp.pending = dropped, 1, None, None


def _kernel_usable(base: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the compiled kernel takes this merge: contiguous CPU tensors of a dtype it converts."""
    return all(t.device.type == "cpu" and t.dtype in _KERNEL_DTYPES and t.is_contiguous() for t in (base, out))


def _kernel_merge(inputs: list[_Input], base: torch.Tensor, out: torch.Tensor, weights: list[float], lam: float,
                  normalize: bool, consensus: bool, div_nc: float) -> int:
    """The merge as one compiled pass: each input's keep rule becomes a band, a draw threshold or DELLA's rule."""
    from mergesearch.merging import kernels  # numba: imported (and the kernel compiled) on first use

    live = [(inp, w) for inp, w in zip(inputs, weights, strict=True) if not inp.zero]  # a dropped one adds +0
    if not live:
        out.copy_(base)
        return int((~torch.isfinite(out)).sum())
    inputs, weights = [inp for inp, _ in live], [w for _, w in live]
    taus = [inp.tau for inp in inputs]
    if len({t.dtype for t in taus}) > 1 or taus[0].dtype not in _KERNEL_DTYPES:  # the kernel takes one dtype
        taus = [t.float() for t in taus]
    rules = dict(coef=[inp.coef for inp in inputs], weights=weights, lam=lam, normalize=normalize,
                 consensus=consensus, div_nc=div_nc, threads=kernel_threads())
    template = next((inp for inp in inputs if inp.draws is not None), None)
    if template is None:
        if not any(inp.band for inp in inputs):  # every entry kept: no band test in the loop
            return kernels.fused_merge(base, out, taus, **rules)
        lo = [inp.band[0] if inp.band and inp.band[0] is not None else -math.inf for inp in inputs]
        hi = [inp.band[1] if inp.band and inp.band[1] is not None else math.inf for inp in inputs]
        return kernels.fused_merge(base, out, taus, lo=lo, hi=hi, **rules)
    # inputs that keep everything read another's draws (and ranks) under a rule that keeps every draw
    draws = [inp.draws if inp.draws is not None else template.draws for inp in inputs]
    if template.della is None:  # int16 draws are always < 32768
        keep = [inp.keep_below if inp.draws is not None else 32768 for inp in inputs]
        return kernels.fused_merge(base, out, taus, draws=draws, keep_below=keep, **rules)
    dells = [inp.della for inp in inputs]
    return kernels.fused_merge(  # p ≥ 2 keeps every draw: draw + 32768 ≤ 65535 < 2·65536
        base, out, taus, draws=draws, ranks=[(d or template.della).ranks for d in dells],
        p_lo=[d.density - d.epsilon if d else 2.0 for d in dells], p_span=[2 * d.epsilon if d else 0.0 for d in dells],
        **rules)


def _below(x: float) -> float:
    """The largest float32 below ``x`` (x >= 0): |τ| > _below(lo) ⟺ |τ| >= lo for float32 τ."""
    return torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(-1.0)).item() if x > 0 else -1.0


def _torch_merge(inputs: list[_Input], base: torch.Tensor, out: torch.Tensor, weights: list[float], lam: float,
                 normalize: bool, consensus: bool, div_nc: float) -> int:
    """out = base + λ·mix(coef_i·kept_i) chunk by chunk in float32 (float64 for float64 inputs); every op writes
    into a preallocated cache-sized buffer. Returns the non-finite count of the rounded output.

    Sign consensus without sign vectors: with g = [Σ u ≥ 0] (0 counts as +), the agreeing part of each
    u_i = coef_i·kept_i is clamp(u_i, L, H) with (L, H) = (0, BIG) where g else (−BIG, 0) — i.e. relu(u_i) or
    min(u_i, 0), the same values and summation order as mergekit's masked sum, in one op over (N, chunk). BIG is
    the working dtype's maximum (float32's maximum is inf in half precision: the bug that wrote NaN).
    The divisor Σ wi·[i agrees] is |Σ wi·sign(agreeing u_i)| for positive weights (all agreeing signs are equal).
    """
    k, n = len(inputs), base.numel()
    c = min(CHUNK, n)
    work, dev = (torch.float64 if base.dtype == torch.float64 else torch.float32), base.device
    big = torch.finfo(work).max
    rows_buf = torch.empty(k, c, dtype=work, device=dev)  # u_i of one chunk, (N, chunk)
    scratch, mixed_buf, lo_buf, hi_buf, res_buf = (torch.empty(c, dtype=work, device=dev) for _ in range(5))
    fmask = torch.empty(c, dtype=work, device=dev)
    cvec = torch.tensor([inp.coef for inp in inputs], dtype=work, device=dev).unsqueeze(1)  # (N, 1)
    wvec = torch.tensor(weights, dtype=work, device=dev).unsqueeze(0)  # (1, N)
    # divisor = Σ wi over agreeing inputs, 0 -> 1. With positive weights a nonzero divisor is >= min wi, and a
    # zero one comes with a zero numerator, so clamping at min wi gives the same quotient in one op.
    positive = min(weights) > 0
    same = out.dtype == work
    bad = torch.zeros((), dtype=torch.int64, device=dev)
    # Views are made once (split) rather than per chunk: each view op costs as much as a small kernel.
    base_c, out_c = base.reshape(-1).split(CHUNK), out.reshape(-1).split(CHUNK)
    tau_c = [inp.tau.reshape(-1).split(CHUNK) for inp in inputs]
    draws_c = [inp.draws.reshape(-1).split(CHUNK) if inp.draws is not None else () for inp in inputs]
    lams = [(_below(inp.band[0]) if inp.band and inp.band[0] is not None else None) for inp in inputs]
    for ci in range(len(base_c)):
        m = base_c[ci].numel()
        w_ = rows_buf[:, :m]
        rows = w_.unbind(0)
        mixed, scr, fm, lo_b, hi_b, res = (x[:m] for x in (mixed_buf, scratch, fmask, lo_buf, hi_buf, res_buf))
        for j, (inp, row) in enumerate(zip(inputs, rows, strict=True)):
            if inp.zero:
                row.zero_()
                continue
            row.copy_(tau_c[j][ci])  # to the working dtype
            if inp.draws is not None:
                row.mul_(torch.lt(draws_c[j][ci], inp.keep_below, out=fm))
            elif inp.band is not None and work == torch.float32:
                # hardshrink keeps |τ| > λ (λ the float just below lo): one op, same entries as the comparison
                if lams[j] is not None:
                    scr.copy_(row)
                    torch.ops.aten.hardshrink.out(scr, lams[j], out=row)
                if inp.band[1] is not None:  # drop |τ| > hi: subtracting those entries is exact (x − x = 0)
                    row.sub_(torch.ops.aten.hardshrink.out(row, inp.band[1], out=scr))
            elif inp.band is not None:  # float64: |τ| rounded to float32 like the band it is compared with
                a = torch.abs(row, out=scr).float()
                if inp.band[0] is not None:
                    row.mul_(a >= inp.band[0])
                if inp.band[1] is not None:
                    row.mul_(a <= inp.band[1])
        w_.mul_(cvec)
        _sum_rows(rows, mixed)
        dest = out_c[ci] if same else res
        if consensus:
            hi = torch.ge(mixed, 0, out=hi_b).mul_(big)
            w_.clamp_(min=torch.sub(hi, big, out=lo_b), max=hi)
            _sum_rows(rows, mixed)
            if normalize:  # w_ is free now: reuse it for the agreement indicators
                if positive:
                    divisor = torch.matmul(wvec, torch.sign(w_, out=w_)).squeeze(0).abs_().clamp_(min=min(weights))
                else:
                    divisor = torch.matmul(wvec, torch.ne(w_, 0, out=w_)).squeeze(0)
                    divisor.add_(torch.eq(divisor, 0, out=fm))
                mixed.div_(divisor)
        elif normalize:
            mixed.div_(div_nc)
        if lam != 1:
            mixed.mul_(lam)
        torch.add(base_c[ci], mixed, out=dest)  # base converted to the working dtype on the way
        if not same:
            out_c[ci].copy_(dest)  # the one rounding
        bad += out_c[ci].numel() - torch.isfinite(out_c[ci]).sum()
    return int(bad.item())


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
