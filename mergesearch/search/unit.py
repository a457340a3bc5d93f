"""Unit-cube transform between Optuna parameters and points of [0, 1]^d (for BoTorch, pymoo and CMA-ES).

Each parameter is one coordinate, in the (sorted-by-insertion) order of ``distributions``:
floats map linearly (or in log space when ``log=True``), ints the same and are rounded back to their step,
categoricals split [0, 1] into k equal bins (choice i is the centre of bin i). Decoding clips to [0, 1] first,
so any point an optimizer proposes decodes to a valid parameter set.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mergesearch.errors import ConfigError


def _bounds(dist: FloatDistribution | IntDistribution) -> tuple[float, float]:
    if dist.log:
        return math.log(dist.low), math.log(dist.high)
    return float(dist.low), float(dist.high)


def to_unit(params: Mapping[str, Any], distributions: Mapping[str, BaseDistribution]) -> np.ndarray:
    """Encode one parameter set.

    Args:
        params: parameter values by name; must hold every name of ``distributions``.
        distributions: the search space, in coordinate order.

    Returns:
        Array of shape (d,) with values in [0, 1], d = len(distributions).
    """
    x = np.empty(len(distributions))
    for i, (name, dist) in enumerate(distributions.items()):
        if name not in params:
            raise ConfigError(f"parameter {name!r} is missing from {sorted(params)}")
        value = params[name]
        if isinstance(dist, CategoricalDistribution):
            x[i] = (dist.to_internal_repr(value) + 0.5) / len(dist.choices)
        elif isinstance(dist, (FloatDistribution, IntDistribution)):
            lo, hi = _bounds(dist)
            v = math.log(value) if dist.log else float(value)
            x[i] = 0.5 if hi == lo else (v - lo) / (hi - lo)
        else:
            raise ConfigError(f"parameter {name!r}: unsupported distribution {type(dist).__name__}")
    return np.clip(x, 0.0, 1.0)


def from_unit(x: np.ndarray, distributions: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """Decode one point of the unit cube (clipped to [0, 1] first).

    Args:
        x: array of shape (d,).
        distributions: the search space, in coordinate order.

    Returns:
        Parameter values by name, each valid for its distribution.
    """
    x = np.clip(np.asarray(x, dtype=float).reshape(-1), 0.0, 1.0)
    if x.shape[0] != len(distributions):
        raise ConfigError(f"point has {x.shape[0]} coordinates, the space has {len(distributions)}")
    params: dict[str, Any] = {}
    for u, (name, dist) in zip(x, distributions.items(), strict=True):
        if isinstance(dist, CategoricalDistribution):
            k = len(dist.choices)
            params[name] = dist.choices[min(int(u * k), k - 1)]
            continue
        lo, hi = _bounds(dist)
        v = lo + u * (hi - lo)
        if dist.log:
            v = math.exp(v)
        if isinstance(dist, IntDistribution):
            step = dist.step
            v = dist.low + step * round((v - dist.low) / step)
            params[name] = int(min(max(v, dist.low), dist.high))
        else:
            if dist.step is not None:
                v = dist.low + dist.step * round((v - dist.low) / dist.step)
            params[name] = float(min(max(v, dist.low), dist.high))
    return params
