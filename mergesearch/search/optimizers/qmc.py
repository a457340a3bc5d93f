"""Optuna's scrambled Sobol sampler (the ``random`` backend), with its sequence kept between trials.

``QMCSampler`` builds a new scrambled Sobol engine for every trial and fast-forwards it to the trial's position
(~2 ms with 25 parameters: the scrambling matrices are drawn again each time), a tenth of the driver's whole
cost per trial. Here the engine is kept and, when the next position is the one it stands at, simply drawn from:
the same points, bit for bit. Any other position (a resume, another study) builds the engine as Optuna does.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution

#: a kept engine is drawn from by one thread at a time (module-level, as Optuna's: the sampler stays picklable)
_LOCK = threading.Lock()


class KeptSobolSampler(optuna.samplers.QMCSampler):
    """``optuna.samplers.QMCSampler`` (same arguments and points) that keeps its engine between trials."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine: Any = None
        self._at: tuple[int, int] | None = None  # (dimension, next position) of the kept engine

    def _sample_qmc(self, study: optuna.Study, search_space: dict[str, BaseDistribution]) -> np.ndarray:
        if self._qmc_type != "sobol":
            return super()._sample_qmc(study, search_space)
        from scipy.stats import qmc

        sample_id = self._find_sample_id(study, search_space)
        d = len(search_space)
        with _LOCK:
            # the points depend only on (seed, dimension, position): any study at that position may draw from it
            if self._engine is None or self._at != (d, sample_id):
                self._engine = qmc.Sobol(d, seed=self._seed, scramble=self._scramble)
                if sample_id > 0:  # Sobol refuses fast_forward(0)
                    self._engine.fast_forward(sample_id)
            self._at = (d, sample_id + 1)
            return self._engine.random(1)
