"""One-pass CPU kernel of the task-vector family (sparsify, weigh, sign consensus, mix), compiled with numba.

The kernel streams each input once in blocks that stay in the core's cache, converting float32, bfloat16 or
float16 inputs to float32 per block, computing in float32 and rounding the result once (round to nearest even)
into the output's dtype. The same block pass counts non-finite results, so the finiteness guard costs no extra
pass over memory. A merge is split into contiguous ranges run on ``threads`` threads (the kernel releases the
GIL). It computes the same float32 operations in the same order as the torch path of
:func:`mergesearch.merging.ops.task_vector_merge` (no fused multiply-adds, no reassociation), hence the same bits
(tests/merging/test_conformance.py).

numba has no float16 on the CPU, so half-precision values travel as their uint16 bit patterns and are
converted with integer operations (exact, and round to nearest even on the way back, like torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

#: elements per block: the (N + 3, BLOCK) scratch rows stay in cache, the inner loops are long enough to vectorise
BLOCK = 2048
#: below this many elements a merge runs on one thread (thread start-up would cost more than it saves)
MIN_PARALLEL = 1 << 18

_U16 = (torch.bfloat16, torch.float16)


@numba.njit(inline="always")
def _load(src, kind, start, m, buf):  # pragma: no cover - runs compiled
    """Block [start, start+m) of ``src`` as float32: a view (kind 0) or converted into ``buf`` (1 bf16, 2 f16)."""
    if kind == 0:
        return src[start:start + m].view(np.float32)
    bits = buf[:m].view(np.uint32)
    if kind == 1:
        for j in range(m):
            bits[j] = np.uint32(src[start + j]) << np.uint32(16)
        return buf[:m]
    for j in range(m):
        h = np.uint32(src[start + j])
        e = h & np.uint32(0x7C00)
        # normal numbers: shift and re-bias the exponent; inf/nan: all-ones exponent; subnormals: mant·2^-24
        o = ((h & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32(0x38000000)
        o = o + np.uint32(0x38000000) if e == np.uint32(0x7C00) else o
        bits[j] = (h & np.uint32(0x8000)) << np.uint32(16) | (o if e != 0 else np.uint32(0))
    for j in range(m):
        h = np.uint32(src[start + j])
        if h & np.uint32(0x7C00) == 0 and h & np.uint32(0x3FF) != 0:
            v = np.float32(h & np.uint32(0x3FF)) * np.float32(5.9604644775390625e-08)
            buf[j] = -v if h & np.uint32(0x8000) else v
    return buf[:m]


@numba.njit(inline="always")
def _store(res, dst, kind, start, m):  # pragma: no cover - runs compiled
    """Write float32 block ``res`` to ``dst`` (converted for kinds 1, 2); returns the non-finite count stored."""
    bad = 0
    if kind == 0:
        lim = np.float32(3.4028234663852886e38)
        o = dst[start:start + m].view(np.float32)
        for j in range(m):
            v = res[j]
            o[j] = v
            bad += not (abs(v) <= lim)  # NaN compares false
        return bad
    u = res[:m].view(np.uint32)
    if kind == 1:
        for j in range(m):
            x = u[j]
            r = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            r = np.uint32(0x7FC0) if (x & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else r
            dst[start + j] = np.uint16(r)
            bad += (r & np.uint32(0x7F80)) == np.uint32(0x7F80)
        return bad
    for j in range(m):
        x = u[j]
        sign = (x >> np.uint32(16)) & np.uint32(0x8000)
        a = x & np.uint32(0x7FFFFFFF)
        if a >= np.uint32(0x47800000):  # overflow -> inf, nan stays nan
            r = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
        elif a < np.uint32(0x38800000):  # result subnormal (or 0): count units of 2^-24, ties to even
            r = np.uint32(np.rint(abs(res[j]) * np.float32(16777216.0)))
        else:
            r = (a - np.uint32(0x38000000) + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))) \
                >> np.uint32(13)
        r |= sign
        dst[start + j] = np.uint16(r)
        bad += (r & np.uint32(0x7C00)) == np.uint32(0x7C00)
    return bad


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _merge(base, bkind, out, okind, taus, tkind, use_draws, draws, lo, hi, keep_below, coef, weights, lam,
           normalize, consensus, div_nc, first, last):  # pragma: no cover - runs compiled
    # Inner loops index block slices (not base + offset) and use selects: both are needed to vectorise.
    k = len(taus)
    f32 = np.float32
    zero, one = f32(0.0), f32(1.0)
    u = np.empty((k, BLOCK), dtype=f32)
    tb = np.empty((k, BLOCK), dtype=f32)  # converted τ blocks (half precision inputs)
    bb = np.empty(BLOCK, dtype=f32)
    s = np.empty(BLOCK, dtype=f32)
    mx = np.empty(BLOCK, dtype=f32)
    d = np.empty(BLOCK, dtype=f32)
    res = np.empty(BLOCK, dtype=f32)
    bad = 0
    for start in range(first, last, BLOCK):
        m = min(BLOCK, last - start)
        s[:m] = zero
        for i in range(k):  # u_i = coef_i · keep_i(τ_i), s = Σ u_i (mergekit's order: u_0 + u_1 + …)
            t = _load(taus[i], tkind, start, m, tb[i])
            c, ui = coef[i], u[i]
            if use_draws:
                r, kb = draws[i][start:start + m], keep_below[i]
                for j in range(m):
                    v = c * t[j] * f32(r[j] < kb)  # a select here does not vectorise (int16 compare)
                    ui[j] = v
                    s[j] += v
            else:
                a_lo, a_hi = lo[i], hi[i]
                for j in range(m):
                    x = t[j]
                    ax = abs(x)
                    v = c * x if (ax >= a_lo) & (ax <= a_hi) else zero
                    ui[j] = v
                    s[j] += v
        b = _load(base, bkind, start, m, bb)
        if not consensus:  # x / 1 and x · 1 are exact, so the unnormalised and λ = 1 cases need no branch
            for j in range(m):
                res[j] = b[j] + s[j] / div_nc * lam
        else:
            # keep the u_i whose sign is the sign of Σ u (0 counts as +, u_i = 0 never agrees); divisor Σ w_i of those
            mx[:m] = zero
            d[:m] = zero
            for i in range(k):
                ui, w = u[i], weights[i]
                for j in range(m):
                    v = ui[j]
                    agree = ((v > zero) == (s[j] >= zero)) & (v != zero)
                    mx[j] += v if agree else zero
                    d[j] += w if agree else zero
            if normalize:  # a zero divisor becomes 1
                for j in range(m):
                    dj = d[j]
                    res[j] = b[j] + mx[j] / (dj if dj != zero else one) * lam
            else:
                for j in range(m):
                    res[j] = b[j] + mx[j] * lam
        bad += _store(res, out, okind, start, m)
    return bad


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _della(tau, tkind, draws, ranks, p_lo, p_span, out):  # pragma: no cover - runs compiled
    f32 = np.float32
    before, after = 0.0, 0.0
    buf = np.empty(BLOCK, dtype=f32)
    n = out.shape[0]
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        t = _load(tau, tkind, start, m, buf)
        for j in range(m):
            x = t[j]
            keep = f32(draws[start + j]) + f32(32768.0) < (p_lo + ranks[start + j] * p_span) * f32(65536.0)
            v = x if keep else f32(0.0)
            out[start + j] = v
            before += abs(x)
            after += abs(v)
    return before, after


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _bracket(tau, tkind, lo, hi, buf, first, last):  # pragma: no cover - runs compiled
    below, m, cap = 0, 0, buf.shape[0]
    blk = np.empty(BLOCK, dtype=np.float32)
    for start in range(first, last, BLOCK):
        k = min(BLOCK, last - start)
        t = _load(tau, tkind, start, k, blk)
        for j in range(k):  # vectorises
            below += abs(t[j]) < lo
        for j in range(k):  # branch-free compaction: always write, advance only inside [lo, hi]
            a = abs(t[j])
            buf[min(m, cap - 1)] = a
            m += (a >= lo) & (a <= hi)
    return below, m


def bracket_select(tau: torch.Tensor, rank: int, lo: float, hi: float, width: int) -> float | None:
    """The |τ| of ascending rank ``rank`` when it lies in [lo, hi] (about ``width`` entries there), in one pass
    split over ``torch.get_num_threads()`` threads like :func:`fused_merge`.

    Returns:
        The value, or None when the bracket held far more entries than ``width`` (ties) or missed the rank.
    """
    src, kind = _array(tau)
    n = src.shape[0]
    parts = max(1, min(torch.get_num_threads(), n // MIN_PARALLEL))
    cuts = [n * p // parts for p in range(parts)] + [n]
    cap = 2 * width + 1024

    def part(p: int) -> tuple[int, int, np.ndarray]:
        buf = np.empty(cap, dtype=np.float32)
        below, m = _bracket(src, kind, np.float32(lo), np.float32(hi), buf, cuts[p], cuts[p + 1])
        return below, m, buf

    if parts == 1:
        results = [part(0)]
    else:
        with ThreadPoolExecutor(parts) as pool:
            results = list(pool.map(part, range(parts)))
    if any(m > cap for _, m, _ in results):
        return None
    below = sum(r[0] for r in results)
    inside = np.concatenate([buf[:m] for _, m, buf in results])
    k = rank - below
    if not 0 <= k < inside.shape[0]:
        return None
    return float(np.partition(inside, k)[k])


def della_mask(tau: torch.Tensor, draws: torch.Tensor, ranks: torch.Tensor, p_lo: float,
               p_span: float) -> tuple[torch.Tensor, float, float]:
    """DELLA's mask⊙τ in one pass, with ‖τ‖₁ and ‖mask⊙τ‖₁ (float64 sums) for the rescale.

    Keeps where draw + 32768 < 65536·p, with p = p_lo + rank·p_span in float32.

    Args:
        tau: task vector (float32, bfloat16 or float16), shape S; ``draws``: its int16 draws, ``ranks``: its
            float32 row ranks in [0, 1].

    Returns:
        (mask⊙τ as a new float32 tensor of shape S, ‖τ‖₁, ‖mask⊙τ‖₁).
    """
    out = torch.empty(tau.shape, dtype=torch.float32)
    f32 = np.float32
    src, kind = _array(tau)
    before, after = _della(src, kind, _array(draws)[0], _array(ranks)[0], f32(p_lo), f32(p_span), _array(out)[0])
    return out, before, after


def fused_merge(base: torch.Tensor, out: torch.Tensor, taus: Sequence[torch.Tensor],
                draws: Sequence[torch.Tensor] | None, lo: Sequence[float], hi: Sequence[float],
                keep_below: Sequence[int], coef: Sequence[float], weights: Sequence[float], lam: float,
                normalize: bool, consensus: bool, div_nc: float, threads: int = 1) -> int:
    """out = base + λ·mix(coef_i · keep_i(τ_i)) in one pass (METHODS.md steps 3–6), computed in float32.

    Args:
        base: θ0, contiguous CPU float32/bfloat16/float16, any shape S; ``out`` the destination (same numel, any of
            those dtypes; may be ``base``).
        taus: N task vectors of numel(S), one dtype among them.
        draws: None (magnitude band) or N int16 draw tensors of numel(S): input i keeps draws < keep_below[i].
        lo, hi: magnitude band of input i: keeps lo[i] <= |τ_i| <= hi[i] (used when ``draws`` is None).
        keep_below: DARE thresholds (used with ``draws``).
        coef: per-input factor of the kept τ_i (weight × rescale); ``weights``: the consensus divisor's weights.
        lam: λ. normalize: divide by Σ weights (of the agreeing inputs under consensus; 0 -> 1).
        consensus: TIES sign election. div_nc: the divisor without consensus (Σ weights or 1).
        threads: how many threads share the pass (contiguous ranges).

    Returns:
        How many output entries are not finite (NaN or ±inf after rounding to the output's dtype).
    """
    b, bkind = _array(base)
    o, okind = _array(out)
    arrays = [_array(t) for t in taus]
    flat, tkind = tuple(a for a, _ in arrays), arrays[0][1]
    # numba needs a tuple of arrays even when unused
    dr = tuple(_array(x)[0] for x in draws) if draws is not None else (np.empty(0, dtype=np.int16),)
    f32 = np.float32
    args = (b, bkind, o, okind, flat, tkind, draws is not None, dr, np.asarray(lo, dtype=f32),
            np.asarray(hi, dtype=f32), np.asarray(keep_below, dtype=np.int32), np.asarray(coef, dtype=f32),
            np.asarray(weights, dtype=f32), f32(lam), normalize, consensus, f32(div_nc))
    n = b.shape[0]
    parts = max(1, min(threads, n // MIN_PARALLEL))
    if parts == 1:
        return int(_merge(*args, 0, n))
    # ranges split on BLOCK boundaries, so every thread sees the same blocks as one thread would (same bits)
    cuts = [min(n, (n * p // parts) // BLOCK * BLOCK) for p in range(parts)] + [n]
    with ThreadPoolExecutor(parts) as pool:
        return sum(pool.map(lambda p: int(_merge(*args, cuts[p], cuts[p + 1])), range(parts)))


def _array(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """A flat numpy view sharing ``t``'s memory (``t`` contiguous) and its kind: 0 float32, 1 bf16, 2 f16 bits."""
    flat = t.detach().view(-1)
    if flat.dtype in _U16:
        return flat.view(torch.int16).numpy().view(np.uint16), 1 if flat.dtype == torch.bfloat16 else 2
    return flat.numpy(), 0
