"""One-pass CPU kernel of the task-vector family (sparsify, weigh, sign consensus, mix), compiled with numba.

The torch path of :func:`mergesearch.merging.ops.task_vector_merge` runs ~16 tensor ops per cache-sized chunk;
this kernel streams each input once and keeps its scratch rows in the core's cache, so a TIES or DARE merge
costs about two passes' worth of time instead of six (``benchmarks/merge_speed.py``). It computes the same float32
operations in the same order as mergekit (no fused multiply-adds, no reassociation), hence the same bits as the
torch path (tests/merging/test_kernels.py). Used for contiguous float32 CPU tensors; other dtypes and devices take
the torch path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch

#: elements per block: the (N + 3, BLOCK) scratch rows stay in cache, the inner loops are long enough to vectorise
BLOCK = 2048


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _merge(base, out, taus, use_draws, draws, lo, hi, keep_below, coef, weights, lam, normalize, consensus,
           div_nc):  # pragma: no cover - runs compiled
    # Inner loops index block slices (not base + offset) and use selects: both are needed to vectorise.
    k, n = len(taus), base.shape[0]
    f32 = np.float32
    zero, one = f32(0.0), f32(1.0)
    u = np.empty((k, BLOCK), dtype=f32)
    s = np.empty(BLOCK, dtype=f32)
    mx = np.empty(BLOCK, dtype=f32)
    d = np.empty(BLOCK, dtype=f32)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        s[:m] = zero
        for i in range(k):  # u_i = coef_i · keep_i(τ_i), s = Σ u_i (mergekit's order: u_0 + u_1 + …)
            t, c, ui = taus[i][start:start + m], coef[i], u[i]
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
        b, o = base[start:start + m], out[start:start + m]
        if not consensus:  # x / 1 and x · 1 are exact, so the unnormalised and λ = 1 cases need no branch
            for j in range(m):
                o[j] = b[j] + s[j] / div_nc * lam
            continue
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
                o[j] = b[j] + mx[j] / (dj if dj != zero else one) * lam
        else:
            for j in range(m):
                o[j] = b[j] + mx[j] * lam


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _della(tau, draws, ranks, p_lo, p_span, out):  # pragma: no cover - runs compiled
    f32 = np.float32
    before, after = 0.0, 0.0
    for j in range(tau.shape[0]):
        x = tau[j]
        keep = f32(draws[j]) + f32(32768.0) < (p_lo + ranks[j] * p_span) * f32(65536.0)
        v = x if keep else f32(0.0)
        out[j] = v
        before += abs(x)
        after += abs(v)
    return before, after


def della_mask(tau: torch.Tensor, draws: torch.Tensor, ranks: torch.Tensor, p_lo: float,
               p_span: float) -> tuple[torch.Tensor, float, float]:
    """DELLA's mask⊙τ in one pass, with ‖τ‖₁ and ‖mask⊙τ‖₁ (float64 sums) for the rescale.

    Same mask as :func:`mergesearch.merging.sparsify.della_mask`: keep where draw + 32768 < 65536·p, with
    p = p_lo + rank·p_span in float32.

    Args:
        tau: float32 task vector, shape S; ``draws``: its int16 draws, ``ranks``: its float32 row ranks in [0, 1].

    Returns:
        (mask⊙τ as a new float32 tensor of shape S, ‖τ‖₁, ‖mask⊙τ‖₁).
    """
    out = torch.empty_like(tau)
    f32 = np.float32
    before, after = _della(_array(tau), _array(draws), _array(ranks), f32(p_lo), f32(p_span), _array(out))
    return out, before, after


def fused_merge(base: torch.Tensor, out: torch.Tensor, taus: Sequence[torch.Tensor],
                draws: Sequence[torch.Tensor] | None, lo: Sequence[float], hi: Sequence[float],
                keep_below: Sequence[int], coef: Sequence[float], weights: Sequence[float], lam: float,
                normalize: bool, consensus: bool, div_nc: float) -> None:
    """out = base + λ·mix(coef_i · keep_i(τ_i)) in one pass (METHODS.md steps 3–6).

    Args:
        base: θ0, float32, any shape S (flattened here); ``out`` the destination, same shape (may be ``base``).
        taus: N task vectors, each numel(S) float32.
        draws: None (magnitude band) or N int16 draw tensors of numel(S): input i keeps draws < keep_below[i].
        lo, hi: magnitude band of input i: keeps lo[i] <= |τ_i| <= hi[i] (used when ``draws`` is None).
        keep_below: DARE thresholds (used with ``draws``).
        coef: per-input factor of the kept τ_i (weight × rescale); ``weights``: the consensus divisor's weights.
        lam: λ. normalize: divide by Σ weights (of the agreeing inputs under consensus; 0 -> 1).
        consensus: TIES sign election. div_nc: the divisor without consensus (Σ weights or 1).
    """
    flat = tuple(_array(t) for t in taus)
    # numba needs a tuple of arrays even when unused
    dr = tuple(_array(x) for x in draws) if draws is not None else (np.empty(0, dtype=np.int16),)
    f32 = np.float32
    _merge(_array(base), _array(out), flat, draws is not None, dr, np.asarray(lo, dtype=f32),
           np.asarray(hi, dtype=f32), np.asarray(keep_below, dtype=np.int32), np.asarray(coef, dtype=f32),
           np.asarray(weights, dtype=f32), f32(lam), normalize, consensus, f32(div_nc))


def _array(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view sharing ``t``'s memory (``t`` contiguous)."""
    return t.detach().view(-1).numpy()
