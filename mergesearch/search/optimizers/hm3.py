"""HM3-style layer-path policy: a preference-conditioned policy and value network over the layer slots.

After Zhou et al., "HM3: Hierarchical Multi-Objective Model Merging" (arXiv 2409.18893), whose code was never
released; this is our reading of it for the ``layer.<k>`` slots of a :class:`~mergesearch.spaces.MergeSpace`.

- State: a preference ω on the simplex over the study's objectives and the slots chosen so far; action: the next
  slot's choice. Policy and value heads share one embedding of (ω, partial path, position): a 2-layer MLP
  (tensor shapes: input ``m + T·(C+1) + T + 1``, hidden ``H``; policy ``C`` logits, value ``m`` outputs, plus a
  linear map from the input to the value so that what adds up over slots extrapolates to unseen paths).
- Objectives are turned to minimisation and scaled per column (:class:`Scale`): 0 = the best stored value, 1 = the
  study's hypervolume reference point (the worst acceptable value; without one, the front's worst), ``1 + log``
  past it. The value of a finished path predicts its objective vector; the value of a partial path what the
  policy reaches from it under ω.
- Reward of a finished path: minus the augmented Tchebycheff scalarisation of the value's prediction under ω,
  ``max_j ω_j (f_j - z_j) + RHO Σ_j ω_j (f_j - z_j)``, around a utopian point ``z`` a ``MARGIN`` beyond the best
  value in sight (stored or predicted). Around the ideal itself, every path predicted past it on the objectives
  ω weighs would tie with the zero-weight terms: the policy could not learn the extremes a corner ω asks for.
- Training: every proposal brings the networks up to date with the stored trials (the ``initial`` points and a
  start-up design of ``n_startup`` paths first), a deterministic chain over the results in the order they
  completed, so storage is the only state and a resume reproduces the same proposals for a seed. Each Adam step
  draws ``PREFS_PER_STEP`` vectors ω from Dirichlet(1) and combines

  1. the value regression on every stored path (offline: the trials in storage are the data);
  2. on-policy rollouts (``ROLLOUTS`` per ω) rewarded by the value of the finished path: the value at each
     prefix regresses on that outcome (the critic) and is the baseline of a GAE(``GAE_LAMBDA``) policy gradient,
     plus an entropy bonus;
  3. policy improvement by the value: at each slot of ``IMPROVED`` rollouts per ω, the choice the value prefers
     with the rest of the path kept is imitated (a one-step search distilled into the policy; without it the
     policy gradient alone needs thousands of steps to coordinate the slots for a mixed ω);
  4. self-imitation of the ``TOP_STORED`` stored paths best under each ω (their real outcome), weighted by how
     much they beat what the policy expects to reach, so the policy moves past them once it finds better.
- Online: ``ask(n)`` draws n preference vectors spread over the simplex (scrambled Sobol points mapped to it).
  Evaluations are the expensive part, so each proposal is a model-based lookahead: per ω, the policy samples
  ``POLICY_CANDIDATES`` paths (mixed with ``EXPLORE`` of the uniform distribution per slot, masked so the path
  keeps ``min_layers..max_layers`` layers), the neighbourhood of the stored trials best under ω adds one- and
  two-slot changes, their prefixes (shallower networks) and moved non-layer parameters, random plans are added,
  and a **value model** (:class:`ValueGP`: a Gaussian process over the path *and* the non-layer parameters,
  refitted at every proposal) picks the candidate with the largest expected hypervolume improvement over
  ``value_draws`` draws from its posterior (each draw one plausible outcome, so unseen paths the model is unsure
  of are tried where they might win; ties go to the optimistic value, mean - ``kappa`` · std, scalarised
  under ω). With ``value_draws: 0`` the policy's sample is proposed as is (the loop as first published).
- Start-up design: the start points first (the driver passes the space's source models as they are,
  ``path:<choice>`` of :meth:`~mergesearch.spaces.MergeSpace.source_paths`: the plain merge, the base, each
  expert), then random paths that draw the number of kept slots uniformly, then which slots and their choices.
  Why the source models: they are the corners every path is judged against and the shallowest complete networks.
  A random path rarely keeps each depth exactly once, so without them no stored trial showed the value model that
  such a network costs least (l1 from the base grows by about the same amount for each depth dropped or repeated),
  and the search kept to deep paths for 60 evaluations or more (on one seed, all 120). With them, on the
  demo's tuning seeds 10-14, the hypervolume after 60 evaluations rose from 0.552 to 0.722 and after 120 from
  0.712 to 0.752, better on 5 of 5 seeds each (``benchmarks/results/hm3_start.*.json``).
- :meth:`HM3Sampler.suggest` (``mergesearch suggest``) ranks, by the ASF that ``pick`` ranks a front by, the
  stored trials at their measured values against new plans at their pessimistic value (mean + 2 · ``kappa`` · std):
  the networks' best path (the policy's greedy path and samples, each improved slot by slot on the value), the
  policy's samples and the front's neighbourhood. A new plan is suggested only when even its pessimistic value
  beats every measured one; otherwise the stored trial best for the preference is suggested again (its outcome
  is known: without this anchor, the value network's optimism on unseen paths put 12 of 30 suggestions off the front).
- Other parameters (method, weights, densities, ``layer_offset.<k>``): with the value model, candidates carry the
  non-layer part of the stored trial best under ω moved by a Gaussian step (sd ``sigma`` of the unit cube,
  categoricals and ints resampled with probability ``sigma``), or drawn at random, and the value model judges the
  whole plan; without it, that moved part is used as is. Start-up points draw them from a scrambled Sobol
  sequence. The recipe (the method and its parameters, :func:`~mergesearch.spaces.space.recipe_parameter`) only
  shapes merged slots, so plans whose path has none are one plan whatever their recipe: such a plan is never
  proposed again with another recipe (on the demo, before, up to 18 of 120 evaluations repeated a plan).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from mergesearch.errors import ConfigError
from mergesearch.search.optimizers.base import BatchSampler, sobol
from mergesearch.search.unit import from_unit, to_unit
from mergesearch.spaces.layers import MERGED, SKIP
from mergesearch.spaces.space import recipe_parameter

LOGIT_CAP = 3.0
REFERENCE_ATTR = "hv_reference"  # the study's hypervolume reference point (mergesearch.search.baselines)
MARGIN = 0.1  # the utopian point of the training scalarisation lies this far beyond the best value in sight
RHO = 0.05  # augmentation of the Tchebycheff scalarisation (breaks ties between weakly dominated points)
PICK_TIE = 1e-6  # pick's ASF breaks exact ties by the weighted sum
PREFS_PER_STEP = 8  # preference vectors ω drawn per training step
ROLLOUTS = 8  # paths the policy samples per ω and step
EXPLORE = 0.1  # share of the uniform distribution mixed into each slot of a proposal (the policy sharpens
# fast and would otherwise stop trying the one-slot changes a layer path often needs, e.g. skipping a repeated depth)
IMPROVED = 4  # rollouts per ω and step whose slot-wise improvement on the value is imitated
TOP_STORED = 4  # stored paths imitated per ω and step (the best under it)
POLICY_CANDIDATES = 48  # paths the policy samples per preference as candidates for one proposal
LOCAL_ANCHORS = 4  # stored trials best under a preference whose neighbourhood supplies candidates
LOCAL_MOVES = 24  # candidates per anchor: one or two slots changed and/or the non-layer parameters moved
RANDOM_CANDIDATES = 64  # random plans per preference among the candidates (the start-up design's draw)
HVI_SAMPLES = 8192  # Monte Carlo points of the hypervolume box (training units) that measure a plan's improvement
HVI_LOW = -0.25  # the box's lower corner in training units (0 = the stored ideal: room to move past it)
SUGGEST_PESSIMISM = 2.0  # suggest adds this many times kappa standard deviations (one-sided ~97.5 % vs ~84 %)
GAE_LAMBDA = 0.5  # credit of a slot's choice: 0 = the value's change it caused, 1 = the finished path's reward
CONFIG_ATTR = "job_config"  # where the driver stores the job config (mergesearch.exporting)


def layer_slots(distributions: Mapping[str, BaseDistribution]) -> list[str]:
    """The ``layer.<k>`` parameter names in slot order (empty when the space has no layer choices)."""
    names = [n for n in distributions if n.startswith("layer.") and n[6:].isdigit()]
    return sorted(names, key=lambda n: int(n[6:]))


def check_layer_space(distributions: Mapping[str, BaseDistribution]) -> list[str]:
    """Slot names, or a one-line ConfigError naming the fix when ``hm3`` cannot search this space."""
    slots = layer_slots(distributions)
    if not slots:
        raise ConfigError("optimizer 'hm3' learns layer paths but the space has no layer slots: add "
                          "space.layers (e.g. layers: {choices: [merged, base, skip]}) or choose another optimizer "
                          "(gp, nsga2, qnehvi)")
    first = distributions[slots[0]]
    for n in slots:
        d = distributions[n]
        if not isinstance(d, CategoricalDistribution) or tuple(d.choices) != tuple(first.choices):
            raise ConfigError(f"optimizer 'hm3': layer slot {n!r} must be categorical with the same choices as "
                              f"{slots[0]!r}")
    return slots


def scalarise(F: Any, w: Any, z: Any = 0.0) -> Any:
    """Augmented Tchebycheff values (lower is better) of ``F`` ``(..., m)`` under weights ``w`` ``(..., m)``
    around the utopian point ``z`` (broadcast to ``(..., m)``): ``max_j w_j (f_j - z_j) + RHO Σ_j w_j (f_j - z_j)``.

    Numpy arrays or torch tensors. With ``z`` at the ideal point this is the ASF that
    :func:`mergesearch.search.preference.pick` ranks a front by (plus the augmentation that breaks its ties).
    """
    x = (F - z) * w
    return (x.amax(-1) if hasattr(x, "amax") else x.max(-1)) + RHO * x.sum(-1)


def simplex_points(n: int, m: int, seed: int) -> np.ndarray:
    """``(n, m)`` preference vectors spread over the simplex (Sobol points through the sorted-spacings map)."""
    if m == 1:
        return np.ones((n, 1))
    u = np.sort(sobol(n, m - 1, seed), axis=1)
    edges = np.concatenate([np.zeros((n, 1)), u, np.ones((n, 1))], axis=1)
    return np.diff(edges, axis=1)


def non_dominated_mask(F: np.ndarray) -> np.ndarray:
    """``(n,)`` True for the rows of ``F`` ``(n, m)`` (minimised) that no other row dominates."""
    le = (F[:, None, :] <= F[None, :, :]).all(-1)  # le[j, i]: row j is at least as good as row i everywhere
    lt = (F[:, None, :] < F[None, :, :]).any(-1)
    return ~(le & lt).any(0)


class Scale:
    """How the policy and value see the objectives: minimisation objectives ``(n, m)`` mapped per column to
    0 = the ideal (best stored value) and 1 = the study's hypervolume reference point (the worst acceptable value,
    where it is worse than the ideal; else the front's worst value), then squashed past 1 by ``1 + log``: a layer
    path that duplicates every layer costs 20 times what the reference allows, and such outliers would otherwise
    dominate the value regression without changing any decision. Invertible (:meth:`raw`), so predictions can be
    read in user units and in :func:`~mergesearch.search.preference.pick`'s units (:meth:`pick_units`).

    Args:
        F: ``(n, m)`` stored objectives, minimisation form.
        reference: ``(m,)`` the reference point in minimisation form, or None.
    """

    def __init__(self, F: np.ndarray, reference: np.ndarray | None = None) -> None:
        self.lo = F.min(0)
        front = F[non_dominated_mask(F)].max(0) - self.lo
        #: pick's scale: the front's spread (one point on the front: the stored spread, else 1)
        self.front = np.where(front > 0, front, np.ptp(F, axis=0))
        self.front = np.where(self.front > 0, self.front, 1.0)
        span = self.front if reference is None else np.where(reference > self.lo, reference - self.lo, self.front)
        self.span = span

    def __call__(self, F: np.ndarray) -> np.ndarray:
        """``(n, m)`` training units of minimisation objectives ``F`` ``(n, m)``."""
        x = (F - self.lo) / self.span
        return np.where(x > 1.0, 1.0 + np.log(np.maximum(x, 1.0)), x)

    def raw(self, g: np.ndarray) -> np.ndarray:
        """Minimisation objectives from training units ``g`` ``(..., m)`` (the inverse of the call)."""
        return self.lo + self.span * np.where(g > 1.0, np.exp(np.minimum(g, 50.0) - 1.0), g)

    def pick_units(self, F: np.ndarray) -> np.ndarray:
        """Minimisation objectives ``(..., m)`` as pick scales the stored front (0 = ideal, 1 = its worst)."""
        return (F - self.lo) / self.front


class Bounds:
    """Which choices keep the path within ``min_layers <= kept <= max_layers`` (a mask per step)."""

    def __init__(self, choices: Sequence[str], slots: int, min_layers: int, max_layers: int) -> None:
        self.C, self.T = len(choices), slots
        self.skip = list(choices).index(SKIP) if SKIP in choices else None
        self.lo, self.hi = max(0, min_layers), min(slots, max_layers)

    def mask(self, k: int, kept: int) -> np.ndarray:
        """``(C,)`` allowed choices at slot ``k`` after ``kept`` kept slots."""
        ok = np.ones(self.C, dtype=bool)
        if self.skip is None:
            return ok
        left = self.T - k - 1  # slots after this one
        can_skip = kept + left >= self.lo
        can_keep = kept < self.hi
        if not can_keep and can_skip:
            ok[:] = False
            ok[self.skip] = True
        elif can_keep and not can_skip:
            ok[self.skip] = False
        return ok

    def masks(self, k: int, kept: np.ndarray) -> np.ndarray:
        """``(B, C)`` allowed choices at slot ``k`` for ``kept`` ``(B,)`` kept slots so far (vectorised mask)."""
        ok = np.ones((len(kept), self.C), dtype=bool)
        if self.skip is None:
            return ok
        can_skip = kept + (self.T - k - 1) >= self.lo
        can_keep = kept < self.hi
        only_skip = ~can_keep & can_skip
        ok[only_skip] = False
        ok[only_skip, self.skip] = True
        ok[can_keep & ~can_skip, self.skip] = False
        return ok

    def along(self, paths: np.ndarray) -> np.ndarray:
        """``(B, T, C)`` allowed choices at every slot of ``paths`` ``(B, T)`` (their own earlier slots kept)."""
        kept = np.zeros(len(paths), dtype=int)
        out = []
        for k in range(self.T):
            out.append(self.masks(k, kept))
            kept += paths[:, k] != self.skip if self.skip is not None else 1
        return np.stack(out, 1)

    def repair(self, path: Sequence[int], fill: int) -> list[int]:
        """The space's own repair (earliest skips filled, latest kept slots skipped), on choice indices."""
        out = list(path)
        if self.skip is None:
            return out
        kept = sum(c != self.skip for c in out)
        for k in range(len(out)):
            if kept >= self.lo:
                break
            if out[k] == self.skip:
                out[k], kept = fill, kept + 1
        for k in reversed(range(len(out))):
            if kept <= self.hi:
                break
            if out[k] != self.skip:
                out[k], kept = self.skip, kept - 1
        return out

    def ok(self, path: Sequence[int]) -> bool:
        kept = sum(c != self.skip for c in path) if self.skip is not None else len(path)
        return self.lo <= kept <= self.hi or self.skip is None


def torch_tanh(x: Any) -> Any:
    import torch

    return torch.tanh(x)


class Rollout(NamedTuple):
    """Paths decoded slot by slot: ``paths`` ``(B, T)`` (choice indices), ``logp`` ``(B, T, C)`` the policy's
    log-probabilities at each slot (choices outside the layer bounds at -1e9), ``values`` ``(B, T+1, m)`` the
    value at each prefix (the last: of the finished path)."""

    paths: Any
    logp: Any
    values: Any


class PolicyValueNet:
    """Policy and value heads on a shared MLP embedding of (ω, partial path, position); built lazily (torch)."""

    def __init__(self, m: int, T: int, C: int, hidden: int) -> None:
        import torch
        from torch import nn

        self.m, self.T, self.C = m, T, C
        n_in = m + T * (C + 1) + T + 1
        self.trunk = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.policy = nn.Linear(hidden, C)
        self.value = nn.Linear(hidden, m)
        # a linear path from the inputs to the value: objectives that add up over slots (a layer's own
        # contribution) extrapolate to unseen paths instead of flattening in the saturated embedding
        self.value_linear = nn.Linear(n_in, m, bias=False)
        nn.init.zeros_(self.value_linear.weight)
        self.modules = [self.trunk, self.policy, self.value, self.value_linear]
        self.params = [p for mod in self.modules for p in mod.parameters()]
        self.torch = torch

    def encode(self, w: Any, paths: Any, k: Any) -> Any:
        """Inputs ``(B, n_in)`` from ω ``(B, m)``, paths ``(B, T)`` (-1: not chosen yet) and positions ``(B,)``."""
        torch = self.torch
        B = w.shape[0]
        onehot = torch.zeros(B, self.T, self.C + 1)
        onehot.scatter_(2, torch.where(paths < 0, self.C, paths).unsqueeze(-1), 1.0)
        pos = torch.zeros(B, self.T + 1)
        pos[torch.arange(B), k] = 1.0
        return torch.cat([w, onehot.reshape(B, -1), pos], dim=1)

    def __call__(self, w: Any, paths: Any, k: Any) -> tuple[Any, Any]:
        """Policy logits ``(B, C)`` and value ``(B, m)`` for ω ``(B, m)``, paths ``(B, T)``, positions ``(B,)``."""
        x = self.encode(w, paths, k)
        h = self.trunk(x)
        # soft-capped logits: no choice's probability falls below ~e^-6 of another's, so the policy keeps
        # exploring and the offline gradients cannot saturate the shared embedding
        return LOGIT_CAP * torch_tanh(self.policy(h) / LOGIT_CAP), self.value(h) + self.value_linear(x)

    def prefixes(self, paths: Any) -> tuple[Any, Any]:
        """Every prefix of ``paths`` ``(N, T)``: partial paths ``(N, T+1, T)`` and positions ``(N, T+1)``."""
        torch = self.torch
        N, T = paths.shape
        steps = torch.arange(T + 1)
        keep = torch.arange(T).unsqueeze(0) < steps.unsqueeze(1)  # (T+1, T): slot j chosen before step k
        partial = torch.where(keep.unsqueeze(0), paths.unsqueeze(1), torch.full_like(paths.unsqueeze(1), -1))
        return partial, steps.expand(N, T + 1)


class ValueGP:
    """The value of a finished plan with its uncertainty: a Gaussian process per objective over the plan (the path
    ``(T,)`` as choice indices and the non-layer unit-cube coordinates ``x`` ``(d,)``) to the objective in training
    units (:class:`Scale`), standardised.

    Kernel (``s`` the signal variance, ``agree`` the share of slots two paths fill with the same choice):
    ``s · [a · agree + (1 - a) · exp(-T · (1 - agree) / lp - |x - x'|² / (2 lx²))]``. The first term is additive
    over slots, so what adds up over slots (a layer's own cost, its distance from the base) extrapolates to paths
    never stored; the second couples the slots with each other and with the non-layer parameters (the same path
    with other expert weights scores differently). Its hyper-parameters (``a``, ``lp``, ``lx``, the noise ratio)
    maximise each objective's marginal likelihood over the grid below, ``s`` in closed form (profiled): no
    optimiser, no random state, so refitting on the stored trials at every proposal keeps storage the only state.

    Why a GP and not the bootstrapped random-feature networks this replaced: on the demo's layer space (120
    evaluations, one demo build) it raised hm3's mean hypervolume from 0.634 to 0.662 on the tuning seeds 10-14
    and from 0.601 to 0.680 on the reported seeds 0-2 (``benchmarks/results/hm3_value_gp.json``). Why not a
    maintained library's mixed-space GP: fitted offline on the plans the hm3 and gp runs of that benchmark evaluated
    (first 30/60/90 trials of 12 runs, predicting the next 15; ``benchmarks/hm3_value_models.py``), BoTorch's
    MixedSingleTaskGP (a length scale per slot, ARD over the weights, fitted by L-BFGS) ranked the next plans
    worse on every objective (Spearman 0.55-0.59 against 0.60-0.72), erred more (mean absolute error 0.15-0.23
    against 0.11-0.21 training units), was overconfident on l1 and took 1242 s against 1.3 s for the 36 fits.

    Args:
        T: slots.
        draws: posterior draws per plan that :meth:`draws` gives (the plausible outcomes ``ask`` rates by).
        seed: seed of those draws.
    """

    MIX = (0.0, 0.25, 0.5, 0.75)  # a: the additive term's share
    LP = (0.5, 1.0, 2.0, 4.0, 8.0)  # lp: slots changed per e-fold of the coupled term
    LX = (0.1, 0.2, 0.4, 0.8, 1.6)  # lx: the non-layer length scale (unit cube)
    NOISE = (1e-4, 1e-3, 1e-2, 0.05, 0.2, 0.5)  # noise variance / s

    def __init__(self, T: int, draws: int, seed: int) -> None:
        self.T, self.E, self.seed = T, draws, seed
        self._fit: tuple | None = None

    @staticmethod
    def _parts(p1: np.ndarray, x1: np.ndarray, p2: np.ndarray, x2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``agree`` and squared non-layer distances ``(B1, B2)`` of plans ``(p1, x1)`` and ``(p2, x2)``."""
        agree = (p1[:, None, :] == p2[None, :, :]).mean(-1)
        return agree, ((x1[:, None, :] - x2[None, :, :]) ** 2).sum(-1)

    def _kernel(self, agree: np.ndarray, dx: np.ndarray, a: float, lp: float, lx: float) -> np.ndarray:
        return a * agree + (1 - a) * np.exp(-(1 - agree) * self.T / lp - dx / (2 * lx * lx))

    def fit(self, paths: np.ndarray, X: np.ndarray, G: np.ndarray) -> ValueGP:
        """Fit on stored paths ``(N, T)``, non-layer coordinates ``X`` ``(N, d)`` and targets ``G`` ``(N, m)``
        (training units); returns self."""
        mean, sdv = G.mean(0), G.std(0) + 1e-9
        y = (G - mean) / sdv
        N, m = y.shape
        agree, dx = self._parts(paths, X, paths, X)
        best: list[tuple | None] = [None] * m  # per objective: (log likelihood, a, lp, lx, noise, s)
        for lp in self.LP:
            for lx in self.LX:
                for a in self.MIX:
                    K0 = self._kernel(agree, dx, a, lp, lx)
                    for g in self.NOISE:
                        try:
                            L = np.linalg.cholesky(K0 + g * np.eye(N))
                        except np.linalg.LinAlgError:
                            continue
                        # (m,) the profiled signal variance; a constant objective (y = 0, e.g. a task every
                        # stored plan scores the same on) has none: floored so its likelihood stays finite
                        s = np.maximum((np.linalg.solve(L, y) ** 2).sum(0) / N, 1e-12)
                        ll = -0.5 * N * np.log(s) - np.log(np.diag(L)).sum()
                        for j in range(m):
                            if best[j] is None or ll[j] > best[j][0]:
                                best[j] = (ll[j], a, lp, lx, g, s[j])
        per = []
        for j, (_, a, lp, lx, g, s) in enumerate(best):  # type: ignore[misc]
            L = np.linalg.cholesky(self._kernel(agree, dx, a, lp, lx) + g * np.eye(N))
            per.append((a, lp, lx, s, L, np.linalg.solve(L.T, np.linalg.solve(L, y[:, j]))))
        self._fit = (paths, X, mean, sdv, per)
        return self

    def predict(self, paths: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and standard deviation of plans (paths ``(B, T)``, ``X`` ``(B, d)``): ``(B, m)`` each,
        in training units."""
        if self._fit is None:
            raise RuntimeError("ValueGP.predict before fit")
        stored, Xs, mean, sdv, per = self._fit
        agree, dx = self._parts(paths, X, stored, Xs)
        mus, sds = [], []
        for a, lp, lx, s, L, alpha in per:
            ks = self._kernel(agree, dx, a, lp, lx)  # (B, N)
            v = np.linalg.solve(L, ks.T)
            mus.append(ks @ alpha)
            sds.append(np.sqrt(np.maximum(1.0 - (v ** 2).sum(0), 1e-12) * s))
        return mean + np.stack(mus, 1) * sdv, np.stack(sds, 1) * sdv

    def draws(self, paths: np.ndarray, X: np.ndarray) -> np.ndarray:
        """``(E, B, m)`` draws of each plan's outcome from its posterior (independent across plans)."""
        mu, sd = self.predict(paths, X)
        z = np.random.default_rng([self.seed, len(paths)]).standard_normal((self.E, *mu.shape))
        return mu[None] + sd[None] * z


class HM3Sampler(BatchSampler):
    """The ``hm3`` backend (see the module docstring).

    Args:
        distributions: the search space; must hold ``layer.<k>`` slots (categoricals with the same choices).
        seed: the user's seed (proposals depend on it and on the stored trials only, so a resume reproduces them).
        n_startup: completed trials before the policy is used (``start`` and random masked paths before).
        min_layers, max_layers: bounds on kept slots; None: read from the job config stored in the study
            (``space.layers``), else 1 and the slot count.
        steps: Adam steps on the first ``n_startup`` results; update_steps: Adam steps per further result;
            hidden: width of the shared embedding; lr: Adam's learning rate.
        sigma: step of the inner sampler for the non-layer parameters (unit-cube sd). 0.3 rather than 0.15: on
            the demo's tuning seeds 10-14 it raised hm3's hypervolume at 120 evaluations from 0.667 to 0.712 (gp:
            0.619) and left seeds 0-2 at 0.610 (gp: 0.697); on seeds 3-5, held out, 0.670 against gp's 0.659
            (``benchmarks/results/hm3_sigma.*.json``).
        entropy: weight of the policy's entropy bonus.
        value_draws: posterior draws of the value model by which ``ask`` chooses among candidate plans (0: no
            value model, the policy's sample is proposed as is, the original HM3 loop); kappa: how many of its
            standard deviations ``ask`` subtracts
            (optimism: exploration) and ``suggest`` adds (pessimism) before scalarising.
        start: complete params proposed first in the start-up design, each once (the driver passes the space's
            source paths).
    """

    def __init__(
        self,
        distributions: Mapping[str, BaseDistribution],
        seed: int,
        *,
        n_startup: int = 10,
        min_layers: int | None = None,
        max_layers: int | None = None,
        steps: int = 60,
        update_steps: int = 8,
        hidden: int = 48,
        lr: float = 3e-3,
        sigma: float = 0.3,
        entropy: float = 0.05,
        value_draws: int = 16,
        kappa: float = 1.0,
        start: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        super().__init__(distributions, seed)
        self.slots = check_layer_space(distributions)
        self.choices: list[str] = list(distributions[self.slots[0]].choices)  # type: ignore[attr-defined]
        self.others = {n: d for n, d in self.distributions.items() if n not in self.slots}
        self.n_startup = n_startup
        self._bounds_given = (min_layers, max_layers)
        self.steps, self.hidden, self.lr, self.sigma, self.entropy = steps, hidden, lr, sigma, entropy
        self.update_steps = update_steps
        self.value_draws, self.kappa = value_draws, kappa
        self.start = [dict(p) for p in start]
        self._chain: dict[str, Any] | None = None  # networks, optimiser and the results they were trained on
        self._reference: tuple[float, ...] | None = None  # the study's reference point (minimisation form)
        self.net: PolicyValueNet | None = None  # the networks of the last rebuild
        self.fill = self.choices.index(MERGED) if MERGED in self.choices else \
            next(i for i, c in enumerate(self.choices) if c != SKIP)
        #: parameters only merged slots read: a path without one is the same plan whatever their values
        self._recipe = {n for n in self.others if recipe_parameter(n)}

    # --- data --------------------------------------------------------------------------------------
    def bounds(self, study: optuna.Study) -> Bounds:
        """Layer bounds: the options, else the stored job config's ``space.layers``, else 1..slots."""
        lo, hi = self._bounds_given
        if lo is None or hi is None:
            layers = ((study.user_attrs.get(CONFIG_ATTR) or {}).get("space") or {}).get("layers") or {}
            lo = lo if lo is not None else layers.get("min_layers")
            hi = hi if hi is not None else layers.get("max_layers")
        T = len(self.slots)
        return Bounds(self.choices, T, 1 if lo is None else int(lo), T if hi is None else int(hi))

    @staticmethod
    def reference(study: optuna.Study) -> tuple[float, ...] | None:
        """The study's stored hypervolume reference point in minimisation form (None when it has none)."""
        point = (study.user_attrs.get(REFERENCE_ATTR) or {}).get("point") or {}
        names = study.user_attrs.get("objective_names") or []
        if len(names) != len(study.directions) or not all(isinstance(point.get(n), (int, float)) for n in names):
            return None
        return tuple(float(point[n]) * (1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0)
                     for n, d in zip(names, study.directions, strict=True))

    def scale(self, F: np.ndarray) -> np.ndarray:
        """Training units ``(n, m)`` of the stored objectives ``F`` ``(n, m)`` (see :class:`Scale`)."""
        return Scale(F, None if self._reference is None else np.array(self._reference))(F)

    def data(self, study: optuna.Study, bounds: Bounds
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict], list[int]]:
        """Completed trials in the order they completed: repaired paths ``(N, T)``, minimisation objectives
        ``(N, m)``, non-layer unit-cube coordinates ``(N, d')``; the params of every trial (pending ones too);
        the completed trials' numbers in that order."""
        sign = np.array([1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in study.directions])
        paths, F, X, seen, order = [], [], [], [], []
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING,
                                                          TrialState.WAITING))
        done = []
        for t in sorted(trials, key=lambda t: t.number):
            if not all(k in t.params for k in self.distributions):
                continue
            seen.append(t.params)
            if t.state == TrialState.COMPLETE and t.values is not None and np.all(np.isfinite(t.values)):
                done.append(t)
        for t in sorted(done, key=lambda t: (t.datetime_complete or datetime.max, t.number)):
            path = [self.choices.index(t.params[s]) for s in self.slots]
            paths.append(bounds.repair(path, self.fill))
            F.append(sign * np.asarray(t.values, dtype=float))
            X.append(to_unit(t.params, self.others) if self.others else np.zeros(0))
            order.append(t.number)
        m = len(sign)
        return (np.array(paths, dtype=np.int64).reshape(-1, len(self.slots)), np.array(F).reshape(-1, m),
                np.array(X).reshape(-1, len(self.others)) if self.others else np.zeros((len(F), 0)), seen, order)

    # --- training ----------------------------------------------------------------------------------
    def new_net(self, m: int, seed: int) -> tuple[PolicyValueNet, Any]:
        """Fresh networks and their Adam optimiser, initialised from ``seed``."""
        import torch

        torch.manual_seed(seed)
        net = PolicyValueNet(m, len(self.slots), len(self.choices), self.hidden)
        return net, torch.optim.Adam(net.params, lr=self.lr)

    def train(self, net: PolicyValueNet, opt: Any, paths: np.ndarray, F: np.ndarray, steps: int, seed: int) -> None:
        """``steps`` Adam steps on stored paths ``(N, T)`` and objectives ``(N, m)`` (deterministic for a seed).

        Each step samples ``PREFS_PER_STEP`` preference vectors ω from Dirichlet(1) and combines (see the module
        docstring): the value regression on the stored paths; on-policy rollouts (``ROLLOUTS`` per ω) with
        their critic and GAE policy gradient; imitation of the rollouts' slot-wise improvement on the value;
        and self-imitation of the stored paths best under each ω.
        """
        import torch

        rng = np.random.default_rng(seed)
        N, m = F.shape
        T, C = paths.shape[1], len(self.choices)
        Fn = self.scale(F)  # (N, m), 0 = the ideal, 1 = the reference point
        tp = torch.as_tensor(paths)
        tf = torch.as_tensor(Fn, dtype=torch.float32)
        bounds = self._last_bounds
        K, R, top = PREFS_PER_STEP, ROLLOUTS, min(N, TOP_STORED)
        partial, pos = net.prefixes(tp)  # (N, T+1, T), (N, T+1)
        masks = torch.as_tensor(bounds.along(paths))  # (N, T, C)
        for _ in range(steps):
            w_np = rng.dirichlet(np.ones(m), K)  # (K, m)
            w = torch.as_tensor(w_np, dtype=torch.float32)
            W = w.repeat_interleave(R, 0)  # (B, m), B = K·R
            # on-policy: paths the policy samples, rewarded by the value of the finished path; the value at
            # each prefix learns what the policy reaches from there and is the baseline of that step's action
            roll = self._rollout(net, W, bounds, rng)
            final = roll.values[:, T].detach()  # (B, m)
            # Tchebycheff around a utopian point beyond everything in sight, the stored ideal (0) and what the
            # value predicts for these paths: around the ideal itself, any path predicted past it on the
            # objectives ω weighs would look equally good (their terms all fall below the zero-weight ones)
            z = torch.minimum(final.min(0).values, torch.zeros(m)) - MARGIN  # (m,)
            loss_critic = ((roll.values[:, :T] - final[:, None]) ** 2).mean()
            # GAE(λ) over the value's scalarised predictions: each slot's action is credited with how much it
            # changed the expected outcome (λ = 0), blended with the finished path's reward (λ = 1)
            v_sc = -scalarise(roll.values.detach(), W[:, None], z)  # (B, T+1); the last entry is the reward
            delta = v_sc[:, 1:] - v_sc[:, :-1]  # (B, T)
            adv = torch.zeros_like(delta)
            run = torch.zeros(len(delta))
            for k in reversed(range(T)):
                run = delta[:, k] + GAE_LAMBDA * run
                adv[:, k] = run
            adv = (adv - adv.mean()) / (adv.std() + 1e-6)
            taken = roll.logp.gather(2, roll.paths[..., None]).squeeze(-1)  # (B, T)
            entropy = -(roll.logp.exp() * roll.logp.clamp(min=-30.0)).sum(-1)  # (B, T)
            loss_pg = -(adv * taken).mean() - self.entropy * entropy.mean()
            # policy improvement by the value: at each slot, the choice the value prefers with the rest of the
            # sampled path kept (a one-step search, distilled into the policy), on IMPROVED rollouts per ω
            some = (torch.arange(K)[:, None] * R + torch.arange(min(R, IMPROVED))[None]).reshape(-1)
            with torch.no_grad():
                target = self.slot_scores(net, W[some], roll.paths[some], z).argmin(-1)  # (K·IMPROVED, T)
            loss_improve = -roll.logp[some].gather(2, target[..., None]).mean()
            # stored trials, in one batch: the value of every stored path (its objective vector, whatever ω:
            # drawn at random per row) and self-imitation of the `top` stored paths best under each ω where
            # their real outcome beats what the policy expects to reach (so it moves past them once it does)
            S = scalarise(Fn[None], w_np[:, None], z.numpy())  # (K, N)
            idx = torch.as_tensor(np.argsort(S, axis=1, kind="stable")[:, :top].reshape(-1))  # (K·top,)
            ret = -torch.as_tensor(np.sort(S, axis=1, kind="stable")[:, :top].reshape(-1), dtype=torch.float32)
            Ws = w.repeat_interleave(top, 0)  # (K·top, m)
            # one batch: every stored path as a finished path, then each selected path's prefixes 0..T
            # (the empty one gives the baseline, the others the imitated actions)
            logits, value = net(
                torch.cat([torch.as_tensor(rng.dirichlet(np.ones(m), N), dtype=torch.float32),
                           Ws.repeat_interleave(T + 1, 0)]),
                torch.cat([tp, partial[idx].reshape(-1, T)]),
                torch.cat([torch.full((N,), T, dtype=torch.long), pos[idx].reshape(-1)]))
            loss_leaf = ((value[:N] - tf) ** 2).mean()
            root = value[N:].reshape(-1, T + 1, m)[:, 0].detach()  # (K·top, m): expected outcome from scratch
            gain = (ret + scalarise(root, Ws, z)).clamp(min=0.0)  # (K·top,)
            sil_logits = logits[N:].reshape(-1, T + 1, C)[:, :T].reshape(-1, C)
            logp = torch.log_softmax(sil_logits.masked_fill(~masks[idx].reshape(-1, C), -1e9), -1)
            chosen = logp.gather(1, tp[idx].reshape(-1, 1)).reshape(-1, T)  # (K·top, T)
            loss_sil = -(gain[:, None] * chosen).mean()
            opt.zero_grad()
            (loss_leaf + loss_critic + loss_pg + loss_improve + loss_sil).backward()
            opt.step()

    def slot_scores(self, net: PolicyValueNet, w: Any, paths: Any, z: Any) -> Any:
        """``(B, T, C)`` the value's scalarised prediction (lower is better) of each path of ``paths``
        ``(B, T)`` with slot k set to choice c, the rest kept (inf where that breaks the layer bounds); ``w``
        ``(B, m)`` the preferences, ``z`` ``(m,)`` the utopian point."""
        torch = net.torch
        B, T, C = paths.shape[0], net.T, net.C
        cand = paths[:, None, None, :].repeat(1, T, C, 1)  # (B, T, C, T)
        k = torch.arange(T)[:, None].expand(T, C)
        c = torch.arange(C)[None, :].expand(T, C)
        cand[:, k, c, k] = c
        cand = cand.reshape(-1, T)
        Wc = w.repeat_interleave(T * C, 0)
        _, v = net(Wc, cand, torch.full((len(cand),), T, dtype=torch.long))
        score = scalarise(v, Wc, z)
        bounds = self._last_bounds
        if bounds.skip is not None:
            kept = (cand != bounds.skip).sum(-1)
            score = score.masked_fill((kept < bounds.lo) | (kept > bounds.hi), float("inf"))
        return score.reshape(B, T, C)

    def improve(self, net: PolicyValueNet, w: Any, paths: Any, score: Callable[[Any, Any], Any]) -> Any:
        """``paths`` ``(B, T)`` improved by one sweep of coordinate descent (slot by slot, in order) on
        ``score(value, w)`` ``(B·C,)`` (lower is better) of the value's prediction ``(B·C, m)`` of the finished
        path under ``w`` ``(B, m)``; a move that would break the layer bounds is never taken."""
        torch = net.torch
        B, T, C = paths.shape[0], net.T, net.C
        bounds = self._last_bounds
        out = paths.clone()
        leaf = torch.full((B * C,), T, dtype=torch.long)
        Wc = w.repeat_interleave(C, 0)
        with torch.no_grad():
            for k in range(T):
                cand = out.unsqueeze(1).repeat(1, C, 1)  # (B, C, T): slot k set to every choice
                cand[:, :, k] = torch.arange(C)
                _, v = net(Wc, cand.reshape(-1, T), leaf)
                s = score(v, Wc).reshape(B, C)
                if bounds.skip is not None:
                    kept = (cand != bounds.skip).sum(-1)
                    s = s.masked_fill((kept < bounds.lo) | (kept > bounds.hi), float("inf"))
                out[:, k] = s.argmin(-1)
        return out

    def _rollout(self, net: PolicyValueNet, w: Any, bounds: Bounds, rng: np.random.Generator,
                 greedy: bool = False, explore: float = 0.0) -> Rollout:
        """Decode one path per row of ``w`` ``(B, m)`` slot by slot under the layer bounds (see :class:`Rollout`);
        ``explore``: each slot's choice is drawn from the policy mixed with this much of the uniform distribution
        over the allowed choices."""
        torch = net.torch
        B, T, C = w.shape[0], net.T, net.C
        path = torch.full((B, T), -1, dtype=torch.long)
        kept = np.zeros(B, dtype=int)
        logps, vals = [], []
        u = torch.as_tensor(rng.random((B, T)), dtype=torch.float32)
        for k in range(T):
            logits, value = net(w, path, torch.full((B,), k, dtype=torch.long))
            mask = torch.as_tensor(bounds.masks(k, kept))
            logp = torch.log_softmax(logits.masked_fill(~mask, -1e9), -1)
            probs = logp.detach().exp()
            if explore > 0:
                probs = (1 - explore) * probs + explore * mask / mask.sum(-1, keepdim=True)
            if greedy:
                a = probs.argmax(-1)
            else:  # inverse-CDF sampling with numpy's uniforms: reproducible from the rng alone
                a = (probs.cumsum(-1) < u[:, k:k + 1]).sum(-1).clamp(max=C - 1)
                a = torch.where(mask.gather(1, a[:, None]).squeeze(1), a, probs.argmax(-1))
            logps.append(logp)
            vals.append(value)
            path = path.clone()
            path[:, k] = a
            kept += (a.numpy() != bounds.skip) if bounds.skip is not None else 1
        _, final = net(w, path, torch.full((B,), T, dtype=torch.long))
        vals.append(final)
        return Rollout(path, torch.stack(logps, 1), torch.stack(vals, 1))

    def decode(self, net: PolicyValueNet, w: np.ndarray, rng: np.random.Generator, greedy: bool = False,
               explore: float = 0.0) -> np.ndarray:
        """Paths ``(B, T)`` (choice indices) for preference vectors ``w`` ``(B, m)`` (``explore``: see
        :meth:`_rollout`)."""
        import torch

        with torch.no_grad():
            roll = self._rollout(net, torch.as_tensor(w, dtype=torch.float32), self._last_bounds, rng, greedy,
                                 explore)
        return roll.paths.numpy()

    # --- proposals ---------------------------------------------------------------------------------
    def rng_for(self, study: optuna.Study) -> np.random.Generator:
        """Randomness of one proposal: from the user's seed and the number of trials in the study only."""
        return np.random.default_rng([self.seed, len(study.get_trials(deepcopy=False)), 19])

    def fit(self, study: optuna.Study) -> tuple[PolicyValueNet | None, np.ndarray, np.ndarray, np.ndarray,
                                                 list[dict]]:
        """Bring the networks up to date with the study (None while fewer than ``n_startup`` trials are complete).

        The networks are a deterministic chain over the completed trials in the order they completed: the
        first ``n_startup`` train them for ``steps`` steps, then each further result adds ``update_steps`` steps
        on the trials completed by then. A fresh sampler on the same study (a resume) replays the chain and
        reaches the same networks; a sampler that has followed the study advances its chain by the new results.
        """
        import torch

        self._last_bounds = self.bounds(study)
        self._reference = self.reference(study)
        paths, F, X, seen, order = self.data(study, self._last_bounds)
        start = max(self.n_startup, 2)
        if len(paths) < start:
            return None, paths, F, X, seen
        chain = self._chain
        if (chain is None or chain["order"] != order[: len(chain["order"])] or chain["m"] != F.shape[1]
                or chain["reference"] != self._reference):
            chain = None  # another study, or history we have not seen: rebuild from the first results
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny networks: more threads only fight over busy cores
        try:
            with torch.random.fork_rng():
                if chain is None:
                    net, opt = self.new_net(F.shape[1], int(np.random.default_rng([self.seed, 29]).integers(2**31)))
                    chain = {"net": net, "opt": opt, "order": order[:start], "m": F.shape[1],
                             "reference": self._reference}
                    self._advance(chain, paths, F, order, start, self.steps)
                for k in range(len(chain["order"]) + 1, len(order) + 1):
                    self._advance(chain, paths, F, order, k, self.update_steps)
        finally:
            torch.set_num_threads(threads)
        self._chain = chain
        self.net = chain["net"]
        return self.net, paths, F, X, seen

    def _advance(self, chain: dict, paths: np.ndarray, F: np.ndarray, order: list[int], k: int, steps: int) -> None:
        """Train the chain on the first ``k`` results (in completion order) for ``steps`` steps."""
        seed = int(np.random.default_rng([self.seed, k, 23]).integers(2**31))
        self.train(chain["net"], chain["opt"], paths[:k], F[:k], steps, seed)
        chain["order"] = order[:k]

    def propose(self, study: optuna.Study, n: int) -> list[dict[str, Any]]:
        rng = self.rng_for(study)
        net, paths, F, X, seen = self.fit(study)
        m = len(study.directions)
        w = simplex_points(n, m, int(rng.integers(2**31)))
        seen_keys = {self._key(p) for p in seen}
        out: list[dict[str, Any]] = []
        if net is None:
            for p in self.start:  # the start points not stored yet first (the base and each expert as they are)
                if len(out) < n and self._key(p) not in seen_keys:
                    seen_keys.add(self._key(p))
                    out.append(p)
            n -= len(out)
            new_paths = np.array([self.random_path(rng) for _ in range(n)]).reshape(n, len(self.slots))
            others = sobol(n, len(self.others), int(rng.integers(2**31))) if self.others else np.zeros((n, 0))
        elif self.value_draws:
            return self.acquire(net, paths, F, X, w, seen_keys, rng)
        else:
            new_paths = self.decode(net, w, rng, explore=EXPLORE)
            others = np.array([self.inner(X, F, wi, rng) for wi in w]).reshape(n, len(self.others))
        for path, x in zip(new_paths, others, strict=True):
            params = self.params_of(path, x)
            for _ in range(50):  # a duplicate of a stored, pending or earlier point of this batch: move it
                if self._key(params) not in seen_keys:
                    break
                path = self.mutate(path, rng)
                x = np.clip(x + rng.normal(0.0, self.sigma, x.shape), 0, 1) if len(x) else x
                params = self.params_of(path, x)
            seen_keys.add(self._key(params))
            out.append(params)
        return out

    def value_model(self, paths: np.ndarray, F: np.ndarray, X: np.ndarray) -> tuple[ValueGP, Scale]:
        """The value model fitted on the completed trials (paths ``(N, T)``, objectives ``(N, m)``, non-layer
        coordinates ``(N, d)``) and the scale of its training units; its draws seeded by the user's seed and N."""
        scale = Scale(F, None if self._reference is None else np.array(self._reference))
        seed = int(np.random.default_rng([self.seed, len(F), 31]).integers(2**31))
        return ValueGP(len(self.slots), self.value_draws, seed).fit(paths, X, scale(F)), scale

    def jitter(self, x: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
        """Non-layer coordinates ``x`` ``(B, d)`` moved by a Gaussian step of ``sd`` (categoricals and ints
        resampled with probability ``sd``), clipped to the unit cube."""
        if not x.shape[-1]:
            return x
        jump = np.array([not isinstance(d, FloatDistribution) for d in self.others.values()])
        out = np.where(jump & (rng.random(x.shape) < sd), rng.random(x.shape), x + rng.normal(0.0, sd, x.shape))
        return np.clip(out, 0.0, 1.0)

    def candidates(self, net: PolicyValueNet, w: np.ndarray, paths: np.ndarray, X: np.ndarray, S: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Candidate plans for preference ``w`` ``(m,)``: paths ``(P, T)`` and non-layer coordinates ``(P, d)``.

        - ``POLICY_CANDIDATES`` paths the policy samples under ``w`` (with ``EXPLORE``), each with the non-layer
          part of the stored trial best under ``w`` moved by ``sigma`` (half) or drawn at random (half);
        - the neighbourhood of the ``LOCAL_ANCHORS`` stored trials best under ``w`` (``S`` ``(N,)``: their
          scalarised values, lower is better): ``LOCAL_MOVES`` each, one or two slots changed (repaired into the
          layer bounds) and/or the non-layer part moved by ``sigma`` or a third of it;
          Each anchor's prefixes too: the path cut after each of its slots (the rest skipped), the shallower
          networks it starts with, which one- and two-slot moves reach only one skip at a time;
        - ``RANDOM_CANDIDATES`` start-up draws (random path, uniform non-layer part).
        """
        T, d = len(self.slots), X.shape[1]
        P = POLICY_CANDIDATES
        pol = self.decode(net, np.repeat(w[None], P, 0), rng, explore=EXPLORE)
        best = X[int(np.argmin(S))] if len(X) else np.zeros(d)
        px = np.where(np.arange(P)[:, None] < P // 2, self.jitter(np.repeat(best[None], P, 0), self.sigma, rng),
                      rng.random((P, d)))
        out_p, out_x = [pol], [px]
        for i in np.argsort(S, kind="stable")[:LOCAL_ANCHORS]:
            lp, lx = [], []
            for j in range(LOCAL_MOVES):
                kind = j % 3  # 0: path only, 1: non-layer part only, 2: both
                path = list(paths[i])
                if kind != 1 or not d:
                    for _ in range(1 + int(rng.random() < 0.5)):
                        path = self.mutate(path, rng)
                x = X[i] if kind == 0 or not d else self.jitter(X[i][None], self.sigma / (1 + 2 * (j % 2)), rng)[0]
                lp.append(path)
                lx.append(x)
            if self._last_bounds.skip is not None:
                for k in range(1, T):
                    cut = list(paths[i][:k]) + [self._last_bounds.skip] * (T - k)
                    lp.append(self._last_bounds.repair(cut, self.fill))
                    lx.append(X[i])
            out_p.append(np.array(lp, dtype=np.int64).reshape(-1, T))
            out_x.append(np.array(lx, dtype=float).reshape(len(lp), d))
        out_p.append(np.array([self.random_path(rng) for _ in range(RANDOM_CANDIDATES)], dtype=np.int64))
        out_x.append(rng.random((RANDOM_CANDIDATES, d)))
        return np.concatenate(out_p), np.concatenate(out_x)

    def acquire(self, net: PolicyValueNet, paths: np.ndarray, F: np.ndarray, X: np.ndarray, w: np.ndarray,
                seen_keys: set, rng: np.random.Generator) -> list[dict[str, Any]]:
        """One proposal per preference of ``w`` ``(n, m)``, chosen among that preference's :meth:`candidates` (not
        stored, pending or proposed earlier in the batch) by the value model: a model-based lookahead, so an
        evaluation is spent only on the plan the model rates best.

        The rating is the expected hypervolume improvement over the stored front, averaged over the model's
        ``value_draws`` posterior draws per plan (each one plausible outcome: unseen plans the model is unsure of
        improve in some and so are explored), measured in training units on :data:`HVI_SAMPLES` fixed Monte Carlo
        points of the box from :data:`HVI_LOW` to the reference point (1). Ties (no draw improves) go to the
        optimistic value (mean - ``kappa`` · std of the draws) scalarised under the preference (augmented
        Tchebycheff around the utopian point ``-MARGIN``). Within a batch, each chosen plan joins the front at its
        mean draw before the next is chosen."""
        model, scale = self.value_model(paths, F, X)
        G = scale(F)
        m = G.shape[1]
        U = HVI_LOW + (1.0 - HVI_LOW) * np.random.default_rng([self.seed, 37]).random((HVI_SAMPLES, m))
        front = G[non_dominated_mask(G)]
        free = ~(front[None, :, :] <= U[:, None, :]).all(-1).any(-1)  # (S,) points the front does not dominate
        out = []
        for wi in w:
            cp, cx = self.candidates(net, wi, paths, X, scalarise(G, wi, -MARGIN), rng)
            draws = model.draws(cp, cx)  # (E, P, m)
            Uf = U[free]
            hvi = np.zeros(len(cp))
            for e in range(len(draws)):  # (P, S'): the draw dominates the free point
                hvi += (draws[e][:, None, :] <= Uf[None, :, :]).all(-1).mean(-1)
            mu, sd = draws.mean(0), draws.std(0)
            acq = scalarise(mu - self.kappa * sd, wi, -MARGIN)
            chosen = None
            for i in np.lexsort((acq, -np.round(hvi, 9))):
                params = self.params_of(cp[i], cx[i])
                if self._key(params) not in seen_keys:
                    chosen = i
                    break
            if chosen is None:  # every candidate is stored already: a random plan
                params = self.params_of(self.random_path(rng), rng.random(X.shape[1]))
            else:
                free &= ~(mu[chosen][None, :] <= U).all(-1)
            seen_keys.add(self._key(params))
            out.append(params)
        return out

    def params_of(self, path: Sequence[int], x: np.ndarray) -> dict[str, Any]:
        """Full params from a path (choice indices) and the non-layer unit-cube coordinates."""
        params = from_unit(x, self.others) if self.others else {}
        params.update({s: self.choices[int(c)] for s, c in zip(self.slots, path, strict=True)})
        return {k: params[k] for k in self.distributions}

    def random_path(self, rng: np.random.Generator) -> list[int]:
        """A random path within the layer bounds (the start-up design): the number of kept slots uniform over the
        bounds, which slots uniform, each kept slot's choice uniform. Drawing every slot's choice uniformly
        instead would keep about T·(C-1)/C slots almost always: the network's depth, the first thing a layer
        search decides, would hardly vary."""
        b = self._last_bounds
        T = len(self.slots)
        if b.skip is None:
            return [int(c) for c in rng.integers(len(self.choices), size=T)]
        kept = int(rng.integers(b.lo, b.hi + 1))
        where = rng.choice(T, kept, replace=False)
        others = [c for c in range(len(self.choices)) if c != b.skip]
        path = [b.skip] * T
        for k in where:
            path[int(k)] = int(rng.choice(others))
        return path

    def mutate(self, path: Sequence[int], rng: np.random.Generator) -> list[int]:
        """``path`` with one slot changed at random, repaired into the layer bounds."""
        out = list(path)
        out[int(rng.integers(len(out)))] = int(rng.integers(len(self.choices)))
        return self._last_bounds.repair(out, self.fill)

    def inner(self, X: np.ndarray, F: np.ndarray, w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Non-layer coordinates for preference ``w``: the best stored trial under ``w``, moved a little."""
        if not len(self.others):
            return np.zeros(0)
        best = X[int(np.argmin(scalarise(self.scale(F), w, -MARGIN)))]
        x = best + rng.normal(0.0, self.sigma, best.shape)
        jump = np.array([not isinstance(d, FloatDistribution) for d in self.others.values()])
        x = np.where(jump & (rng.random(best.shape) < self.sigma), rng.random(best.shape), x)
        return np.clip(x, 0.0, 1.0)

    def _key(self, params: Mapping[str, Any]) -> tuple:
        """What tells plans apart: the params, the recipe's left out where the repaired path has no merged slot."""
        path = self._last_bounds.repair([self.choices.index(params[s]) for s in self.slots], self.fill)
        inert = MERGED not in [self.choices[c] for c in path]
        return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in params.items()
                            if not (inert and k in self._recipe)))

    def suggest(self, study: optuna.Study, weights: Sequence[float]) -> dict[str, Any]:
        """The plan expected best for ``weights`` by the ASF that :func:`~mergesearch.search.preference.pick`
        ranks the front by; see :func:`mergesearch.search.suggest.suggest`.

        With the value model (``value_draws`` > 0) the contenders are the stored trials, at their measured values,
        and new plans, at their pessimistic value (posterior mean + ``SUGGEST_PESSIMISM`` · ``kappa`` · std, so a
        plan far from the data must be predicted better by a margin to win): the networks' :meth:`best_path` with
        the non-layer part of the stored trial best under ``weights``, the policy's samples and the neighbourhood
        of the stored trials best under ``weights`` (:meth:`candidates`). A stored trial that wins is suggested
        again (its outcome is known); otherwise the new plan. Without the value model: :meth:`best_path` with that
        non-layer part.

        Raises:
            ConfigError: fewer completed trials than the policy needs.
        """
        net, paths, F, X, _ = self.fit(study)
        if net is None:
            raise ConfigError(f"optimizer 'hm3': needs at least {max(self.n_startup, 2)} completed trials to "
                              f"suggest a path, the study has {len(paths)}")
        w = np.asarray(weights, dtype=float).reshape(1, -1)
        w = w / w.sum()
        scale = Scale(F, None if self._reference is None else np.array(self._reference))
        rng = np.random.default_rng(self.seed)
        path = self.best_path(net, w[0], scale, rng)
        stored = pick_asf(scale.pick_units(F), w)  # (N,)
        others = X[int(np.argmin(stored))] if len(self.others) else np.zeros(0)
        if not self.value_draws:
            return self.params_of(path, others)
        model, _ = self.value_model(paths, F, X)
        cp, cx = self.candidates(net, w[0], paths, X, stored, rng)
        cp, cx = np.concatenate([path[None], cp]), np.concatenate([others[None], cx])
        mu, sd = model.predict(cp, cx)
        new = pick_asf(scale.pick_units(scale.raw(mu + SUGGEST_PESSIMISM * self.kappa * sd)), w)
        keys = {self._key(self.params_of(p, x)) for p, x in zip(paths, X, strict=True)}
        new = np.where([self._key(self.params_of(p, x)) in keys for p, x in zip(cp, cx, strict=True)], np.inf, new)
        i, j = int(np.argmin(stored)), int(np.argmin(new))
        if stored[i] <= new[j]:
            return self.params_of(paths[i], X[i])
        return self.params_of(cp[j], cx[j])

    def best_path(self, net: PolicyValueNet, w: np.ndarray, scale: Scale, rng: np.random.Generator,
                  samples: int = 63) -> np.ndarray:
        """The path ``(T,)`` the networks expect best under ``w`` ``(m,)`` by the ASF that
        :func:`~mergesearch.search.preference.pick` ranks the front by (:func:`pick_asf` of the value's prediction
        in pick's units, ``scale``): the policy's greedy path and ``samples`` paths it samples, each improved slot by
        slot on the value until no slot changes, ranked by the value."""
        import torch

        def score(v: Any, W: Any) -> Any:
            return torch.as_tensor(pick_asf(scale.pick_units(scale.raw(v.numpy())), W.numpy()))

        W = torch.as_tensor(np.repeat(w[None], samples + 1, 0), dtype=torch.float32)
        cand = np.concatenate([self.decode(net, w[None], rng, greedy=True),
                               self.decode(net, np.repeat(w[None], samples, 0), rng)])
        paths = torch.as_tensor(cand)
        T = len(self.slots)
        with torch.no_grad():
            for _ in range(T):
                better = self.improve(net, W, paths, score)
                if torch.equal(better, paths):
                    break
                paths = better
            _, v = net(W, paths, torch.full((len(paths),), T, dtype=torch.long))
        return paths[int(np.argmin(score(v, W)))].numpy()


def pick_asf(P: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``(...,)`` pick's ASF ``max_j w_j p_j`` of objectives ``P`` ``(..., m)`` in its units (0 = the front's
    ideal, 1 = its worst) under weights ``w`` ``(..., m)``, its ties broken by the weighted sum (lower is better)."""
    x = P * w
    return x.max(-1) + PICK_TIE * x.sum(-1)


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Checked ``hm3`` options (one-line ConfigError naming the bad key)."""
    out: dict[str, Any] = {}
    for key in ("n_startup", "steps", "update_steps", "hidden", "min_layers", "max_layers", "value_draws"):
        if key in options:
            v = options[key]
            lo = 0 if key in ("n_startup", "value_draws") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"optimizer option {key!r} must be an integer >= {lo}, got {v!r}")
            out[key] = v
    if out.get("min_layers", 1) > out.get("max_layers", out.get("min_layers", 1)):
        raise ConfigError(f"optimizer options: min_layers ({out['min_layers']}) > max_layers ({out['max_layers']})")
    for key, (lo, hi) in {"lr": (0.0, 1.0), "sigma": (0.0, 1.0), "entropy": (0.0, 10.0), "kappa": (0.0, 10.0)}.items():
        if key in options:
            v = options[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"optimizer option {key!r} must be a number in [{lo:g}, {hi:g}], got {v!r}")
            out[key] = float(v)
    return out


OPTION_KEYS = frozenset({"n_startup", "steps", "update_steps", "hidden", "lr", "sigma", "entropy", "min_layers",
                         "max_layers", "value_draws", "kappa"})

__all__ = ["OPTION_KEYS", "HM3Sampler", "check_layer_space", "scalarise", "simplex_points", "validate_options"]
