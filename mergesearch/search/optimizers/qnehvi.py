"""BoTorch qLogNEHVI: independent GPs per objective, batch hypervolume improvement with pending points.

Per batch: inputs are the unit-cube encoding of every completed trial; objectives are negated to
maximisation and standardised (the fitted units); one SingleTaskGP per objective (ModelListGP) is fitted with
a capped optimiser, warm-started from the previous batch's hyperparameters; the reference point is mapped
into the fitted units; RUNNING trials are X_pending, so the batch avoids points already being evaluated.
Categoricals and ints are relaxed to continuous coordinates and rounded on decoding (the cheap mixed path).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

from mergesearch.search.optimizers.base import BatchSampler, observed, sobol
from mergesearch.search.unit import from_unit


def fitted_units(
    F: np.ndarray, directions: Sequence[Any], reference_point: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Objectives and reference point in the units the GPs are fitted in (maximised, standardised).

    Args:
        F: (n, m) objective values turned into minimisation (see ``observed``), n >= 2.
        directions: the study's m directions (to map ``reference_point``).
        reference_point: (m,) worst acceptable values in the objectives' own units, or None for the nadir
            of the data minus 10 % of its range.

    Returns:
        Yn: (n, m) standardised maximisation targets; ref: (m,) reference point in the same units.
    """
    Y = -F
    mean, std = Y.mean(0), Y.std(0, ddof=1)
    std = np.where(std > 1e-12, std, 1.0)
    Yn = (Y - mean) / std
    if reference_point is None:
        return Yn, Yn.min(0) - 0.1 * (Yn.max(0) - Yn.min(0)) - 1e-6
    sign = np.array([1.0 if s == optuna.study.StudyDirection.MAXIMIZE else -1.0 for s in directions])
    return Yn, (sign * np.asarray(reference_point, dtype=float) - mean) / std


def no_fused_kernel() -> None:
    """Keep BoTorch's qLogNEHVI on its PyTorch code path: never JIT-compile its fused C++ kernel.

    BoTorch 0.18 builds that kernel on the first qLogNEHVI of a process when no build is cached
    (``torch.utils.cpp_extension.load`` with ninja and ``-march=native``): the first ``qnehvi`` ask on each machine
    took 31-60 s here instead of ~2 s (the driver's "rare stall"), runs a compiler inside the driver, and caches a
    binary for this CPU in the home directory, which a shared home on a mixed cluster hands to other CPUs. The
    kernel bought nothing measurable for our asks (two fresh processes each, 40 trials, 2 cores: one trial 1.8 and
    1.8 s with it, 1.3 and 1.6 s without; sixteen 10.6 and 8.5 s with it, 10.2 and 10.6 s without). Setting
    BoTorch's "already tried" flag is a private switch: where a BoTorch version lacks it, nothing is changed.
    """
    from botorch.acquisition.multi_objective import logei

    if hasattr(logei, "_load_attempted") and getattr(logei, "_C", None) is None:
        logei._load_attempted = True


class QNEHVISampler(BatchSampler):
    """qLogNoisyExpectedHypervolumeImprovement (BoTorch) as a batch sampler.

    Args:
        distributions: the search space.
        seed: sampler seed.
        n_startup: completed trials needed before the GP is used (Sobol points before that).
        reference_point: per objective, in the objectives' own units and directions (worst acceptable
            value); None: nadir of the observed values minus 10 % of their range, in fitted units.
        fit_maxiter: cap on L-BFGS iterations of the GP fit.
        num_restarts: restarts of the acquisition optimiser.
        raw_samples: raw samples initialising the acquisition optimiser.
        mc_samples: quasi-MC samples of the acquisition.
        alpha: approximation level of the hypervolume box decomposition; None: exact up to 3 objectives, 1e-2
            from 4 on (the exact decomposition of each MC sample's front took ~100 s per ask with 4 objectives
            and 40 points here, alpha=1e-2 ~6 s).
    """

    def __init__(
        self,
        distributions: Mapping[str, BaseDistribution],
        seed: int,
        *,
        n_startup: int,
        reference_point: Sequence[float] | None,
        fit_maxiter: int = 100,
        num_restarts: int = 2,
        raw_samples: int = 64,
        mc_samples: int = 64,
        alpha: float | None = None,
    ) -> None:
        super().__init__(distributions, seed)
        self.n_startup = n_startup
        self.reference_point = None if reference_point is None else np.asarray(reference_point, dtype=float)
        self.fit_maxiter = fit_maxiter
        self.num_restarts = num_restarts
        self.raw_samples = raw_samples
        self.mc_samples = mc_samples
        self.alpha = alpha
        self._warm: list[dict[str, Any]] | None = None  # GP hyperparameters of the previous batch

    def propose(self, study: optuna.Study, n: int) -> list[dict[str, Any]]:
        X, F, P = observed(study, self.distributions)
        d = len(self.distributions)
        seed = int(self.batch_rng().integers(2**31))
        if len(X) < max(self.n_startup, 2):
            return [from_unit(x, self.distributions) for x in sobol(n, d, seed)]
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            cand = self._acquire(X, F, P, n, study.directions)
        return [from_unit(x, self.distributions) for x in cand]

    def _acquire(self, X: np.ndarray, F: np.ndarray, P: np.ndarray, n: int, directions: Sequence[Any]) -> np.ndarray:
        """Optimise the acquisition; returns (n, d) candidates in the unit cube."""
        import torch
        from botorch.acquisition.multi_objective.logei import (
            qLogNoisyExpectedHypervolumeImprovement,
        )
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms.input import Normalize
        from botorch.optim import optimize_acqf
        from botorch.sampling import SobolQMCNormalSampler
        from gpytorch.mlls import SumMarginalLogLikelihood

        no_fused_kernel()
        dtype = torch.double
        d = X.shape[1]
        Yn, ref = fitted_units(F, directions, self.reference_point)
        bounds = torch.stack([torch.zeros(d, dtype=dtype), torch.ones(d, dtype=dtype)])
        tx = torch.as_tensor(X, dtype=dtype)
        models = [
            SingleTaskGP(
                tx,
                torch.as_tensor(Yn[:, [j]], dtype=dtype),
                input_transform=Normalize(d, bounds=bounds),
                outcome_transform=None,  # already standardised above: the ref point lives in these units
            )
            for j in range(Yn.shape[1])
        ]
        model = ModelListGP(*models)
        if self._warm is not None:
            for m, state in zip(models, self._warm, strict=True):
                m.load_state_dict(state, strict=False)
        mll = SumMarginalLogLikelihood(model.likelihood, model)
        fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": self.fit_maxiter}})
        self._warm = [{k: v for k, v in m.state_dict().items() if not k.startswith("input_transform")} for m in models]
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model=model,
            ref_point=torch.as_tensor(ref, dtype=dtype).tolist(),
            X_baseline=tx,
            X_pending=torch.as_tensor(P, dtype=dtype) if len(P) else None,
            prune_baseline=True,
            alpha=self.alpha if self.alpha is not None else (0.0 if Yn.shape[1] <= 3 else 1e-2),
            sampler=SobolQMCNormalSampler(torch.Size([self.mc_samples])),
        )
        cand, _ = optimize_acqf(
            acq,
            bounds=bounds,
            q=n,
            num_restarts=self.num_restarts,
            raw_samples=self.raw_samples,
            options={"batch_limit": 5, "maxiter": 100},
            sequential=True,
        )
        return cand.detach().numpy()
