"""Sparsifiers of task vectors (mergekit 0.1.5 semantics), with an optional cache of magnitude order.

A magnitude mask keeps entries whose |τ| lies between two order statistics of |τ| over the whole tensor. The
order statistics come from :class:`MagnitudeOrder` (|τ| sorted once, then an index lookup per density — what
the resident merger uses to re-merge at new densities without sorting again) or, without a cache, from
:func:`select_abs` (an exact O(n) selection, used by one-shot merges). Both give the same values, hence
identical merges.
Entries tied in magnitude with the threshold are all kept (mergekit keeps an arbitrary subset of them); with
real-valued weights such ties are vanishingly rare, and tied zeros contribute nothing either way.
"""

from __future__ import annotations

import bisect

import torch

from mergesearch.errors import ConfigError

SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
#: DARE rescaling variants: mergekit's L1-norm matching (default) and the paper's 1/density.
RESCALE_VARIANTS = ("l1", "inverse_density")


#: evenly spaced ranks whose |τ| a MagnitudeOrder keeps (16 KiB a tensor); a rank between two of them costs one
#: pass over τ that gathers the ~n/QUANTILES entries of that bracket
QUANTILES = 4096


class MagnitudeOrder:
    """Order statistics of |τ| of one tensor, kept compact for a resident merger.

    One sort (of the int32 bit patterns of the float32 magnitudes: for non-negative floats that order is the
    numeric order, and torch sorts int32 with a radix sort, ~5x faster than a float sort) gives the exact |τ| at
    ``QUANTILES + 1`` evenly spaced ranks; the sort itself is dropped, so the cache is 16 KiB a tensor instead of
    a float32 copy of τ. The value at any other rank lies between two kept ones: :func:`bracket_select` finds
    it exactly with one pass over τ. Tensors of at most ``QUANTILES + 1`` entries keep their full sort.
    """

    def __init__(self, tau: torch.Tensor):
        s = _abs_f32(tau).view(torch.int32).sort().values.view(torch.float32)
        self.numel = n = s.numel()
        self.ranks: list[int] | None = None
        if n > QUANTILES + 1:
            self.ranks = [i * (n - 1) // QUANTILES for i in range(QUANTILES + 1)]
            s = s[torch.tensor(self.ranks, device=s.device)].clone()
        self.table = s

    def value(self, rank: int, tau: torch.Tensor) -> torch.Tensor:
        """The |τ| of ascending rank ``rank`` (0 = smallest) of ``tau`` (the tensor this order was made from)."""
        if self.ranks is None:
            return self.table[rank]
        i = bisect.bisect_right(self.ranks, rank) - 1
        if self.ranks[i] == rank or self.table[i] == self.table[i + 1]:
            return self.table[i]
        return bracket_select(tau, rank, self.table[i].item(), self.table[i + 1].item(),
                              self.ranks[i + 1] - self.ranks[i])


def _abs_f32(tau: torch.Tensor) -> torch.Tensor:
    """|τ| flattened as a fresh float32 tensor (abs maps −0 to +0, so bit patterns order like values)."""
    flat = tau.detach().reshape(-1)
    return flat.abs() if flat.dtype == torch.float32 else flat.float().abs_()


def bracket_select(tau: torch.Tensor, rank: int, lo: float, hi: float, width: int) -> torch.Tensor:
    """The |τ| of ascending rank ``rank``, known to lie in [lo, hi] with about ``width`` entries in between.

    One pass counts the entries below ``lo`` and gathers those in [lo, hi]; a selection on that small set
    answers. On the CPU the pass is compiled and reads τ in its own dtype (no float32 copy).
    """
    if tau.device.type == "cpu" and tau.is_contiguous() and tau.dtype in (torch.float32, torch.bfloat16,
                                                                          torch.float16):
        from mergesearch.merging import kernels

        v = kernels.bracket_select(tau, rank, lo, hi, width)
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


#: below this size, order statistics come straight from kthvalue
_SELECT_SAMPLE = 1 << 16


def select_abs(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """The |τ| of ascending rank ``rank`` without sorting: exact, O(n), ~4x faster than ``kthvalue``.

    A seeded sample brackets the rank's value; one pass counts the entries below the bracket and gathers those
    inside, and ``kthvalue`` runs on that small set. If the bracket misses (rare), plain ``kthvalue`` answers.
    """
    a = _abs_f32(tau)
    n = a.numel()
    if n <= _SELECT_SAMPLE:
        return a.kthvalue(rank + 1).values
    m = 4096
    gen = torch.Generator().manual_seed(n)
    sample = a[torch.randint(n, (m,), generator=gen).to(a.device)].sort().values
    q = rank / (n - 1)
    lo = sample[max(0, int((q - 0.03) * (m - 1)))]
    hi = sample[min(m - 1, int((q + 0.03) * (m - 1)) + 1)]
    return _select_in(a, rank, lo, hi)


def order_value(tau: torch.Tensor, rank: int, order: MagnitudeOrder | None) -> torch.Tensor:
    """The |τ| of ascending rank ``rank``, from the cache or by selection."""
    if order is not None:
        return order.value(rank, tau)
    return select_abs(tau, rank)


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
    return order_value(tau, n_bot, order), None if hi_rank >= n - 1 else order_value(tau, hi_rank, order)


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
    hist = torch.zeros(65537, dtype=torch.float64, device=tau.device)
    hist.index_add_(0, draws.reshape(-1).int().add_(32769), tau.detach().reshape(-1).abs().double())
    return hist.cumsum_(0)


def della_rank_norm(tau: torch.Tensor) -> torch.Tensor:
    """Rank of |τ| within its row scaled to [0, 1] (float32, ``tau``'s shape; a 1-D tensor is one row).

    Independent of density and epsilon, so a resident merger computes it once per tensor.
    """
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    ranks = rows.abs().float().argsort(dim=1).argsort(dim=1).float()
    width = rows.shape[1] - 1
    return (ranks / width if width > 0 else torch.zeros_like(ranks)).reshape(tau.shape)


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
