"""HM3-style layer-path policy: a preference-conditioned policy and value network over the layer slots.

After Zhou et al., "HM3: Hierarchical Multi-Objective Model Merging" (arXiv 2409.18893), whose code was never
released; this is our reading of it for the ``layer.<k>`` slots of a :class:`~mergesearch.spaces.MergeSpace`.

- State: a preference ω on the simplex over the study's objectives and the slots chosen so far; action: the next
  slot's choice. Policy and value heads share one embedding of (ω, partial path, position): a 2-layer MLP
  (tensor shapes: input ``m + T·(C+1) + T + 1``, hidden ``H``; policy ``C`` logits, value ``m`` outputs).
- Reward at the end of a path: minus the augmented Tchebycheff scalarisation of its objective vector under ω,
  ``max_j ω_j f_j + 0.05 Σ_j ω_j f_j``, on objectives turned to minimisation and scaled to [0, 1] over the stored
  trials (0 = best seen). The value head predicts the normalised objective vector from any (ω, partial path).
- Training: every proposal rebuilds the networks from the stored trials (the ``initial`` points and a start-up
  design of ``n_startup`` random paths first), so storage is the only state and a resume reproduces the same
  proposals for a seed. Each of ``steps`` Adam steps samples preference vectors from Dirichlet(1) and takes
  (1) the value regression on stored paths and every prefix of them, (2) a policy gradient on the stored paths
  (their real reward under ω, the value's scalarised prediction at each prefix as the baseline) and (3) a
  policy gradient on paths the policy samples itself, rewarded by the value head's prediction of the full path
  (again with the value as baseline), plus an entropy bonus. New results change the stored trials, so they
  update the networks at the next ask.
- Online: ``ask(n)`` draws n preference vectors spread over the simplex (scrambled Sobol points mapped to it)
  and samples one path per vector from the policy, masked so the path keeps ``min_layers..max_layers`` layers.
- Other parameters (method, weights, densities, ``layer_offset.<k>``) come from an inner, preference-aware
  sampler: the non-layer part of the stored trial that is best under the same ω, moved by a Gaussian step
  (sd ``sigma`` of the unit cube; categoricals and ints resampled with probability ``sigma``). Start-up points
  draw them from a scrambled Sobol sequence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from mergesearch.errors import ConfigError
from mergesearch.search.optimizers.base import BatchSampler, sobol
from mergesearch.search.unit import from_unit, to_unit

SKIP = "skip"
LOGIT_CAP = 3.0
RHO = 0.05  # augmentation of the Tchebycheff scalarisation (breaks ties between weakly dominated points)
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


def scalarise(F: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Augmented Tchebycheff values (lower is better) of ``F`` ``(..., m)`` under weights ``w`` ``(..., m)``."""
    x = F * w  # numpy arrays or torch tensors
    return (x.amax(-1) if hasattr(x, "amax") else x.max(-1)) + RHO * x.sum(-1)


def simplex_points(n: int, m: int, seed: int) -> np.ndarray:
    """``(n, m)`` preference vectors spread over the simplex (Sobol points through the sorted-spacings map)."""
    if m == 1:
        return np.ones((n, 1))
    u = np.sort(sobol(n, m - 1, seed), axis=1)
    edges = np.concatenate([np.zeros((n, 1)), u, np.ones((n, 1))], axis=1)
    return np.diff(edges, axis=1)


def normalise(F: np.ndarray) -> np.ndarray:
    """Minimisation objectives ``(n, m)`` scaled to [0, 1] per column over the rows (0 = best)."""
    lo, span = F.min(0), np.ptp(F, axis=0)
    return (F - lo) / np.where(span > 0, span, 1.0)


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
        self.params = [*self.trunk.parameters(), *self.policy.parameters(), *self.value.parameters()]
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
        h = self.trunk(self.encode(w, paths, k))
        # soft-capped logits: no choice's probability falls below ~e^-6 of another's, so the policy keeps
        # exploring and the offline gradients cannot saturate the shared embedding
        return LOGIT_CAP * torch_tanh(self.policy(h) / LOGIT_CAP), self.value(h)

    def prefixes(self, paths: Any) -> tuple[Any, Any]:
        """Every prefix of ``paths`` ``(N, T)``: partial paths ``(N, T+1, T)`` and positions ``(N, T+1)``."""
        torch = self.torch
        N, T = paths.shape
        steps = torch.arange(T + 1)
        keep = torch.arange(T).unsqueeze(0) < steps.unsqueeze(1)  # (T+1, T): slot j chosen before step k
        partial = torch.where(keep.unsqueeze(0), paths.unsqueeze(1), torch.full_like(paths.unsqueeze(1), -1))
        return partial, steps.expand(N, T + 1)


class HM3Sampler(BatchSampler):
    """The ``hm3`` backend (see the module docstring).

    Args:
        distributions: the search space; must hold ``layer.<k>`` slots (categoricals with the same choices).
        seed: the user's seed (proposals depend on it and on the stored trials only, so a resume reproduces them).
        n_startup: completed trials before the policy is used (random masked paths and Sobol points before).
        min_layers, max_layers: bounds on kept slots; None: read from the job config stored in the study
            (``space.layers``), else 1 and the slot count.
        steps: Adam steps on the first ``n_startup`` results; update_steps: Adam steps per further result;
            hidden: width of the shared embedding; lr: Adam's learning rate.
        sigma: step of the inner sampler for the non-layer parameters (unit-cube sd).
        entropy: weight of the policy's entropy bonus.
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
        sigma: float = 0.15,
        entropy: float = 0.05,
    ) -> None:
        super().__init__(distributions, seed)
        self.slots = check_layer_space(distributions)
        self.choices: list[str] = list(distributions[self.slots[0]].choices)  # type: ignore[attr-defined]
        self.others = {n: d for n, d in self.distributions.items() if n not in self.slots}
        self.n_startup = n_startup
        self._bounds_given = (min_layers, max_layers)
        self.steps, self.hidden, self.lr, self.sigma, self.entropy = steps, hidden, lr, sigma, entropy
        self.update_steps = update_steps
        self._chain: dict[str, Any] | None = None  # networks, optimiser and the results they were trained on
        self.net: PolicyValueNet | None = None  # the networks of the last rebuild
        self.fill = self.choices.index("merged") if "merged" in self.choices else \
            next(i for i, c in enumerate(self.choices) if c != SKIP)

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
        """``steps`` Adam steps on stored paths ``(N, T)`` and objectives ``(N, m)`` (deterministic for a seed)."""
        import torch

        rng = np.random.default_rng(seed)
        N, m = F.shape
        T, C = paths.shape[1], len(self.choices)
        tp = torch.as_tensor(paths)
        tf = torch.as_tensor(normalise(F), dtype=torch.float32)
        partial, pos = net.prefixes(tp)  # (N, T+1, T), (N, T+1)
        act = torch.cat([tp, torch.zeros(N, 1, dtype=torch.long)], dim=1)  # the action at each prefix (last: none)
        bounds = self._last_bounds
        kept = np.zeros(N, dtype=int)
        step_masks = []
        for k in range(T):
            step_masks.append(bounds.masks(k, kept))
            kept += paths[:, k] != bounds.skip if bounds.skip is not None else 1
        masks = torch.as_tensor(np.stack(step_masks, 1))  # (N, T, C)
        K, B, R = 6, min(N, 24), 8  # preference vectors, stored paths and own rollouts (per vector) per step
        for _ in range(steps):
            w = torch.as_tensor(rng.dirichlet(np.ones(m), K), dtype=torch.float32)  # (K, m)
            idx = torch.as_tensor(rng.choice(N, B, replace=False))
            # (1) value regression and (2) policy gradient on stored paths, every (ω, prefix) pair
            W = w[:, None, None, :].expand(K, B, T + 1, m).reshape(-1, m)
            P = partial[idx].unsqueeze(0).expand(K, B, T + 1, T).reshape(-1, T)
            Kp = pos[idx].unsqueeze(0).expand(K, B, T + 1).reshape(-1)
            logits, value = net(W, P, Kp)
            target = tf[idx].unsqueeze(0).unsqueeze(2).expand(K, B, T + 1, m).reshape(-1, m)
            loss_v = ((value - target) ** 2).mean()
            reward = -scalarise(target, W)  # (K·B·(T+1),) real reward of the whole stored path under ω
            base = -scalarise(value.detach(), W)  # the value's prediction from this prefix, scalarised
            step = Kp < T
            adv = (reward - base)[step]
            adv = adv / (adv.std() + 1e-6)
            mask = masks[idx].unsqueeze(0).expand(K, B, T, C).reshape(-1, C)
            logp = torch.log_softmax(logits[step].masked_fill(~mask, -1e9), -1)
            a = act[idx].unsqueeze(0).expand(K, B, T + 1).reshape(-1)[step]
            # off-policy data: only better-than-baseline paths are reinforced (pushing down logged actions of
            # another policy has no bound); the on-policy term below uses both signs
            loss_pg = -(adv.clamp(min=0.0) * logp.gather(1, a[:, None]).squeeze(1)).mean()
            # (3) on-policy rollouts rewarded by the value head's prediction of the finished path
            lp, ent, vals, final = self._rollout(net, w.repeat_interleave(R, 0), bounds, rng)
            r = -scalarise(final.detach(), w.repeat_interleave(R, 0))
            adv2 = (r[:, None] - vals.detach())  # (K·R, T): reward minus the value baseline at each step
            adv2 = adv2 / (adv2.std() + 1e-6)
            loss_on = -(adv2 * lp).mean() - self.entropy * ent.mean()
            opt.zero_grad()
            (loss_v + loss_pg + 0.5 * loss_on).backward()
            opt.step()

    def _rollout(self, net: PolicyValueNet, w: Any, bounds: Bounds, rng: np.random.Generator,
                 greedy: bool = False) -> tuple[Any, Any, Any, Any]:
        """Decode one path per row of ``w`` ``(B, m)`` slot by slot under the layer bounds.

        Returns:
            log-probabilities ``(B, T)`` of the actions taken, entropies ``(B, T)``, the value's scalarised
            baseline at each step ``(B, T)``, and the value's prediction for the finished paths ``(B, m)``.
        """
        torch = net.torch
        B, T, C = w.shape[0], net.T, net.C
        path = torch.full((B, T), -1, dtype=torch.long)
        kept = np.zeros(B, dtype=int)
        lps, ents, vals = [], [], []
        u = torch.as_tensor(rng.random((B, T)), dtype=torch.float32)
        for k in range(T):
            logits, value = net(w, path, torch.full((B,), k, dtype=torch.long))
            mask = torch.as_tensor(bounds.masks(k, kept))
            logp = torch.log_softmax(logits.masked_fill(~mask, -1e9), -1)
            probs = logp.exp()
            if greedy:
                a = probs.argmax(-1)
            else:  # inverse-CDF sampling with numpy's uniforms: reproducible from the rng alone
                a = (probs.detach().cumsum(-1) < u[:, k:k + 1]).sum(-1).clamp(max=C - 1)
                a = torch.where(mask.gather(1, a[:, None]).squeeze(1), a, probs.argmax(-1))
            lps.append(logp.gather(1, a[:, None]).squeeze(1))
            ents.append(-(probs * logp).sum(-1))
            vals.append(-scalarise(value, w))
            path = path.clone()
            path[:, k] = a
            if bounds.skip is not None:
                kept += (a.numpy() != bounds.skip)
            else:
                kept += 1
        _, final = net(w, path, torch.full((B,), T, dtype=torch.long))
        self._decoded = path
        return torch.stack(lps, 1), torch.stack(ents, 1), torch.stack(vals, 1), final

    def decode(self, net: PolicyValueNet, w: np.ndarray, rng: np.random.Generator, greedy: bool = False
               ) -> np.ndarray:
        """Paths ``(B, T)`` (choice indices) for preference vectors ``w`` ``(B, m)``."""
        import torch

        with torch.no_grad():
            self._rollout(net, torch.as_tensor(w, dtype=torch.float32), self._last_bounds, rng, greedy=greedy)
        return self._decoded.numpy()

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
        paths, F, X, seen, order = self.data(study, self._last_bounds)
        start = max(self.n_startup, 2)
        if len(paths) < start:
            return None, paths, F, X, seen
        chain = self._chain
        if chain is None or chain["order"] != order[: len(chain["order"])] or chain["m"] != F.shape[1]:
            chain = None  # another study, or history we have not seen: rebuild from the first results
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny networks: more threads only fight over busy cores
        try:
            with torch.random.fork_rng():
                if chain is None:
                    net, opt = self.new_net(F.shape[1], int(np.random.default_rng([self.seed, 29]).integers(2**31)))
                    chain = {"net": net, "opt": opt, "order": order[:start], "m": F.shape[1]}
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
        net, _, F, X, seen = self.fit(study)
        m = len(study.directions)
        w = simplex_points(n, m, int(rng.integers(2**31)))
        if net is None:
            new_paths = np.array([self.random_path(rng) for _ in range(n)]).reshape(n, len(self.slots))
            others = sobol(n, len(self.others), int(rng.integers(2**31))) if self.others else np.zeros((n, 0))
        else:
            new_paths = self.decode(net, w, rng)
            others = np.array([self.inner(X, F, wi, rng) for wi in w]).reshape(n, len(self.others))
        seen_keys = {self._key(p) for p in seen}
        out = []
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

    def params_of(self, path: Sequence[int], x: np.ndarray) -> dict[str, Any]:
        """Full params from a path (choice indices) and the non-layer unit-cube coordinates."""
        params = from_unit(x, self.others) if self.others else {}
        params.update({s: self.choices[int(c)] for s, c in zip(self.slots, path, strict=True)})
        return {k: params[k] for k in self.distributions}

    def random_path(self, rng: np.random.Generator) -> list[int]:
        """A uniformly random path within the layer bounds (the start-up design)."""
        b = self._last_bounds
        path, kept = [], 0
        for k in range(len(self.slots)):
            allowed = np.flatnonzero(b.mask(k, kept))
            c = int(rng.choice(allowed))
            path.append(c)
            kept += c != b.skip
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
        best = X[int(np.argmin(scalarise(normalise(F), w)))]
        x = best + rng.normal(0.0, self.sigma, best.shape)
        jump = np.array([not isinstance(d, FloatDistribution) for d in self.others.values()])
        x = np.where(jump & (rng.random(best.shape) < self.sigma), rng.random(best.shape), x)
        return np.clip(x, 0.0, 1.0)

    def best_others(self, X: np.ndarray, F: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Non-layer coordinates of the stored trial best under ``w`` (no move)."""
        return X[int(np.argmin(scalarise(normalise(F), w)))] if len(self.others) else np.zeros(0)

    @staticmethod
    def _key(params: Mapping[str, Any]) -> tuple:
        return tuple(sorted((k, round(v, 12) if isinstance(v, float) else v) for k, v in params.items()))

    def suggest(self, study: optuna.Study, weights: Sequence[float]) -> dict[str, Any]:
        """The path the policy expects best for ``weights`` (greedy decoding) with the non-layer parameters of
        the stored trial best under them; see :func:`mergesearch.search.suggest.suggest`.

        Raises:
            ConfigError: fewer completed trials than the policy needs.
        """
        net, paths, F, X, _ = self.fit(study)
        if net is None:
            raise ConfigError(f"optimizer 'hm3': needs at least {max(self.n_startup, 2)} completed trials to "
                              f"suggest a path, the study has {len(paths)}")
        w = np.asarray(weights, dtype=float).reshape(1, -1)
        w = w / w.sum()
        path = self.decode(net, w, np.random.default_rng(self.seed), greedy=True)[0]
        return self.params_of(path, self.best_others(X, F, w[0]))


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Checked ``hm3`` options (one-line ConfigError naming the bad key)."""
    out: dict[str, Any] = {}
    for key in ("n_startup", "steps", "update_steps", "hidden", "min_layers", "max_layers"):
        if key in options:
            v = options[key]
            lo = 0 if key == "n_startup" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"optimizer option {key!r} must be an integer >= {lo}, got {v!r}")
            out[key] = v
    for key, (lo, hi) in {"lr": (0.0, 1.0), "sigma": (0.0, 1.0), "entropy": (0.0, 10.0)}.items():
        if key in options:
            v = options[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"optimizer option {key!r} must be a number in [{lo:g}, {hi:g}], got {v!r}")
            out[key] = float(v)
    return out


OPTION_KEYS = frozenset({"n_startup", "steps", "update_steps", "hidden", "lr", "sigma", "entropy", "min_layers",
                         "max_layers"})

__all__ = ["OPTION_KEYS", "HM3Sampler", "check_layer_space", "scalarise", "simplex_points", "validate_options"]
