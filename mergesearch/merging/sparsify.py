"""Sparsifiers of task vectors (mergekit 0.1.5 semantics), with an optional cache of magnitude order.

A magnitude mask keeps entries whose |τ| lies between two order statistics of |τ| over the whole tensor. They
come from :class:`MagnitudeOrder`: counts of |τ| by the top bits of its pattern, one pass over τ and a few KiB,
then a lookup (bfloat16/float16) or one gathering pass (float32) per rank — exact either way. The resident
merger keeps the counts to re-merge at new densities; one-shot merges count and drop them (:func:`select_abs`).
Entries tied in magnitude with the threshold are all kept (mergekit keeps an arbitrary subset of them); with
real-valued weights such ties are vanishingly rare, and tied zeros contribute nothing either way.
"""

from __future__ import annotations

import numpy as np
import torch

from mergesearch.errors import ConfigError
from mergesearch.merging.threads import kernel_threads

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
#: DARE rescaling variants: mergekit's L1-norm matching (default) and the paper's 1/density.
RESCALE_VARIANTS = ("l1", "inverse_density")


#: tensors of at most this many entries keep their whole sorted |τ| (16 KiB at most): a lookup answers every rank
SMALL = 4097
_HALF = (torch.bfloat16, torch.float16)


class MagnitudeOrder:
    """Order statistics of |τ| of one tensor, kept compact for a resident merger: counts of |τ| by key.

    One counting pass files every entry under the key of its magnitude (:func:`magnitude_keys`: the bit pattern
    of |τ| cut to 15 bits, which orders like |τ|) and keeps the occupied keys with their cumulative counts — a
    few KiB a tensor instead of a sort of τ, and no copy of τ is made. The key of any rank is then a lookup.
    For bfloat16/float16 τ a key is one magnitude, so that is the answer. For float32 τ a key spans 2^16
    adjacent floats: :func:`bracket_select` finds the exact value with one pass over τ that gathers that key's
    entries (their number is known). Tensors of at most :data:`SMALL` entries, and those whose keys would take
    more room than a sort, keep their full sorted |τ| instead.

    Attributes:
        numel: entries of τ.
        keys: occupied keys, ascending (int16, K entries; empty when ``sorted`` is kept).
        ends: ends[j] = entries whose key is at most keys[j] (int32, K entries).
        sorted: the sorted |τ| (float32) of a tensor where that is smaller than the keys, else None.
    """

    def __init__(self, tau: torch.Tensor):
        self.numel = n = tau.numel()
        self.half = tau.dtype in _HALF
        self.sorted: torch.Tensor | None = None
        self.keys = torch.empty(0, dtype=torch.int16)
        self.ends = torch.empty(0, dtype=torch.int32)
        if n > SMALL:
            counts = magnitude_keys(tau)
            keys = counts.nonzero().squeeze(1)
            if keys.numel() * 6 < n * 4:  # else a sort is smaller (mid-sized tensors with spread magnitudes)
                self.keys = keys.to(torch.int16)  # keys < 2^15
                ends = counts[keys].cumsum(0)
                self.ends = ends.to(torch.int32) if n < 1 << 31 else ends
                return
        # the int32 bit patterns of non-negative floats sort like the values (radix sort, faster)
        self.sorted = _abs_f32(tau).view(torch.int32).sort().values.view(torch.float32).cpu()

    @property
    def nbytes(self) -> int:
        """Bytes this order holds: 6 per occupied key (at most 192 KiB), or 4 per entry when that is less."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.ends, self.sorted) if t is not None)

    def value(self, rank: int, tau: torch.Tensor) -> torch.Tensor:
        """The |τ| of ascending rank ``rank`` (0 = smallest) of ``tau`` (the tensor this order was made from),
        as a float32 scalar tensor."""
        if self.sorted is not None:
            return self.sorted[rank]
        # numpy's search and indexing on views: torch's took ~70 µs a call with the scalar's conversion
        ends = self.ends.numpy()
        j = int(np.searchsorted(ends, rank, side="right"))
        key = int(self.keys.numpy()[j])
        if self.half:
            return _key_value(key, tau.dtype)
        below = int(ends[j - 1]) if j else 0
        return bracket_select(tau, rank, _bits_f32(key << 16), _bits_f32(key << 16 | 0xFFFF), below,
                              int(ends[j]) - below)


def magnitude_keys(tau: torch.Tensor) -> torch.Tensor:
    """Counts of ``tau``'s entries by magnitude key (int64, 2^15 entries, on the CPU).

    The key is the bit pattern of |τ| without its sign bit, cut to 15 bits: bfloat16/float16 keep all their
    bits, float32 (and float64, through float32) its top 16. Both paths (the compiled pass, torch chunks
    elsewhere) count the same keys.
    """
    if tau.device.type == "cpu" and tau.is_contiguous() and tau.dtype in (torch.float32, *_HALF):
        from mergesearch.merging import kernels

        return torch.from_numpy(kernels.key_counts(tau, threads=kernel_threads()))
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=tau.device)
    for chunk in tau.detach().reshape(-1).split(1 << 22):  # chunks bound the int32 key buffer
        if chunk.dtype in _HALF:
            keys = chunk.view(torch.int16).int().bitwise_and_(0x7FFF)
        else:
            keys = _abs_f32(chunk).view(torch.int32).bitwise_right_shift_(16)
        counts += torch.bincount(keys, minlength=1 << 15)
    return counts.cpu()


def _bits_f32(bits: int) -> float:
    """The float32 whose bit pattern is ``bits`` (0 <= bits < 2^31)."""
    return float(np.uint32(bits).view(np.float32))


def _key_value(key: int, dtype: torch.dtype) -> torch.Tensor:
    """The magnitude (float32 scalar tensor) of a bfloat16/float16 key."""
    return torch.tensor(key, dtype=torch.int16).view(dtype).float()


def _abs_f32(tau: torch.Tensor) -> torch.Tensor:
    """|τ| flattened as a fresh float32 tensor (abs maps −0 to +0, so bit patterns order like values)."""
    flat = tau.detach().reshape(-1)
    return flat.abs() if flat.dtype == torch.float32 else flat.float().abs_()


def bracket_select(tau: torch.Tensor, rank: int, lo: float, hi: float, below: int, width: int) -> torch.Tensor:
    """The |τ| of ascending rank ``rank``, known to lie in [lo, hi], with ``below`` entries under ``lo`` and
    ``width`` in between (a :class:`MagnitudeOrder` key's counts).

    One pass gathers the entries in [lo, hi]; a selection on that small set answers. On the CPU the pass over a
    float32 τ is compiled (no copy).
    """
    if tau.device.type == "cpu" and tau.is_contiguous() and tau.dtype == torch.float32:
        from mergesearch.merging import kernels

        v = kernels.bracket_select(tau, rank - below, lo, hi, width)
        if v is not None:
            return torch.tensor(v, dtype=torch.float32)
    return _select_in(_abs_f32(tau), rank, torch.tensor(lo, device=tau.device), torch.tensor(hi, device=tau.device))


def _select_in(a: torch.Tensor, rank: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The value of ascending rank ``rank`` of ``a`` (flat, non-negative), searched within [lo, hi] first."""
    below = int(torch.lt(a, lo).sum().item())
    inside = a[torch.ge(a, lo).logical_and_(torch.le(a, hi))]
    if below <= rank < below + inside.numel():
        return inside.kthvalue(rank - below + 1).values
    return a.kthvalue(rank + 1).values


def select_abs(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """The |τ| of ascending rank ``rank`` without sorting or copying τ: exact, O(n) — a counting pass, then
    (float32) one pass over the rank's key (:class:`MagnitudeOrder`)."""
    return MagnitudeOrder(tau).value(rank, tau)


def order_value(tau: torch.Tensor, rank: int, order: MagnitudeOrder | None) -> torch.Tensor:
    """The |τ| of ascending rank ``rank``, from the cache or by selection."""
    return (order or MagnitudeOrder(tau)).value(rank, tau)


def outliers_band(tau: torch.Tensor, density: float, gamma: float, order: MagnitudeOrder | None = None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Model Breadcrumbs' kept band [lo, hi] of |τ| (density < 1); lo None means nothing is kept.

    Drop the ``int(gamma·n)`` largest |τ|, then the smallest, keeping ``int(density·n)``. When the top cut and
    the kept count exceed n, fewer top entries are dropped (the density wins). With ``int(gamma·n) == 0`` no
    top entry is dropped — the band simply ends at the largest entry (hi None).
    """
    n = tau.numel()
    target = int(density * n)
    if target <= 0:
        return None, None
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    hi_rank = n_bot + target - 1
    order = order or MagnitudeOrder(tau)  # one counting pass serves both ends
    return order.value(n_bot, tau), None if hi_rank >= n - 1 else order.value(hi_rank, tau)


def band_l1(tau: torch.Tensor, lo: float, hi: float | None) -> tuple[float, float]:
    """(‖τ‖₁, Σ |τ| over lo <= |τ| <= hi) in float64, for the L1 rescale of a magnitude band (one pass)."""
    a = _abs_f32(tau)
    keep = a >= lo
    if hi is not None:
        keep &= a <= hi
    return a.sum(dtype=torch.float64).item(), (a * keep).sum(dtype=torch.float64).item()


def uniform_draws(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded uniform int16 draws behind DARE masks (2 bytes an entry, so a resident merger can keep them)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-32768, 32768, tuple(shape), dtype=torch.int16, generator=gen)


def keep_below(density: float) -> int:
    """Draws below this value are kept: P(keep) = density, to a resolution of 2^-16."""
    return -32768 + round(density * 65536)


def l1_by_draw(tau: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Cumulative ‖τ‖₁ by draw value, for DARE's L1 rescale at any density without a pass over τ.

    Args:
        tau: task vector, shape S.
        draws: its int16 draws (:func:`uniform_draws`), shape S.

    Returns:
        float64 tensor of 65537 entries: entry j = Σ |τ| over draws < j − 32768, so the kept norm at a density
        is ``table[keep_below(density) + 32768]`` and ‖τ‖₁ is ``table[-1]``.
    """
    if tau.device.type == "cpu" and tau.is_contiguous() and draws.is_contiguous() and tau.dtype in (
            torch.float32, *_HALF):
        from mergesearch.merging import kernels

        return kernels.l1_hist(tau, draws).cumsum_(0)
    hist = torch.zeros(65537, dtype=torch.float64, device=tau.device)
    hist.index_add_(0, draws.reshape(-1).int().add_(32769), tau.detach().reshape(-1).abs().double())
    return hist.cumsum_(0)


#: entries of |τ| whose int64 sort indices :func:`della_ranks` holds at a time (a block of whole rows)
RANK_BLOCK = 1 << 20


def _rows(tau: torch.Tensor) -> torch.Tensor:
    """``tau`` as (rows, columns): DELLA ranks within the first dimension's rows; a 1-D tensor is one row."""
    return tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)


def della_ranks(tau: torch.Tensor) -> torch.Tensor:
    """Rank of |τ| within its row (0 = smallest), shape of ``tau``; what a resident merger keeps for DELLA.

    Compact: uint16 (int32 for rows longer than 65536), 2 bytes an entry instead of a float32 or int64 copy, and
    computed a block of rows at a time so the sort's int64 indices never cover more than :data:`RANK_BLOCK`
    entries. Rows are sorted by the same call as a whole-tensor sort, so ties rank the same.
    """
    rows = _rows(tau)
    n_rows, cols = rows.shape
    out = torch.empty(rows.shape, dtype=torch.uint16 if cols <= 1 << 16 else torch.int32, device=tau.device)
    step = max(1, RANK_BLOCK // max(cols, 1))
    positions = torch.arange(cols, dtype=torch.int32, device=tau.device).expand(min(step, n_rows), cols)
    for r0 in range(0, n_rows, step):
        order = rows[r0:r0 + step].abs().float().argsort(dim=1)
        # the inverse permutation of the sort order is the rank (what argsort(argsort) computes)
        ranks = torch.empty(order.shape, dtype=torch.int32, device=tau.device)
        out[r0:r0 + step] = ranks.scatter_(1, order, positions[:order.shape[0]])
    return out.reshape(tau.shape)


def della_width(shape: torch.Size | tuple[int, ...]) -> int:
    """The largest rank of a row of a tensor of ``shape`` (its row length − 1)."""
    numel = torch.Size(shape).numel()
    cols = numel if len(shape) < 2 else numel // shape[0] if shape[0] else 0
    return max(cols - 1, 0)


def rank_norm(ranks: torch.Tensor) -> torch.Tensor:
    """Row ranks (:func:`della_ranks`) scaled to [0, 1]: rank / (row length − 1) in float32, 0 for 1-wide rows."""
    width = della_width(ranks.shape)
    r = ranks.float()
    return r / width if width > 0 else torch.zeros_like(r)


def della_rank_norm(tau: torch.Tensor) -> torch.Tensor:
    """Rank of |τ| within its row scaled to [0, 1] (float32, ``tau``'s shape; a 1-D tensor is one row).

    Independent of density and epsilon, so a resident merger computes it once per tensor (kept compact, as
    :func:`della_ranks`).
    """
    return rank_norm(della_ranks(tau))


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float,
                        rank_norm: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA keep probabilities: per row, linear in the rank of |τ| from density−ε (smallest) to density+ε.

    Returns:
        float32 tensor of ``tau``'s shape.
    """
    check_della(density, epsilon)
    rank_norm = della_rank_norm(tau) if rank_norm is None else rank_norm
    return (density - epsilon) + rank_norm * (2 * epsilon)


def check_della(density: float, epsilon: float) -> None:
    """ConfigError unless density ± epsilon lies strictly inside (0, 1)."""
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ConfigError(f"della: density ± epsilon must lie strictly inside (0, 1), got density={density}, "
                          f"epsilon={epsilon}")


def della_mask(tau: torch.Tensor, density: float, epsilon: float, draws: torch.Tensor,
               rank_norm: torch.Tensor | None = None) -> torch.Tensor | None:
    """DELLA (MagPrune): keep each entry with its rank's probability p, using the seeded draws like DARE.

    Args:
        tau: task vector, shape S; ``draws`` its int16 uniforms (:func:`uniform_draws`), shape S.

    Returns:
        bool mask of shape S (draw + 32768 < 65536·p, i.e. P(keep) = p to within 2^-16), or None (keep all).
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    probs = della_probabilities(tau, density, epsilon, rank_norm)
    return (draws.float() + 32768) < probs * 65536


def l1_rescale_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """mergekit's rescale ‖τ‖₁ / ‖mask⊙τ‖₁ from the two norms, or 1 when either is below ``eps``."""
    if before < eps or after < eps:
        return 1.0
    return before / after
