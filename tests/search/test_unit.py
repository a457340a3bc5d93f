"""Unit-cube transform: round trips, bounds, categorical bins, clipping."""

from __future__ import annotations

import numpy as np
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mergesearch.errors import ConfigError
from mergesearch.search.unit import from_unit, to_unit

SPACE = {
    "w": FloatDistribution(-1.0, 2.0),
    "lr": FloatDistribution(1e-5, 1e-1, log=True),
    "q": FloatDistribution(0.0, 1.0, step=0.25),
    "n": IntDistribution(2, 12, step=2),
    "m": IntDistribution(1, 64, log=True),
    "method": CategoricalDistribution(["ties", "dare_ties", "slerp", None]),
    "fixed": FloatDistribution(0.5, 0.5),
}


def test_closed_form_encoding():
    x = to_unit({"w": 0.5, "lr": 1e-3, "q": 0.75, "n": 2, "m": 8, "method": "slerp", "fixed": 0.5}, SPACE)
    np.testing.assert_allclose(x, [0.5, 0.5, 0.75, 0.0, 0.5, 2.5 / 4, 0.5])


def test_round_trip_of_random_points():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = from_unit(rng.random(len(SPACE)), SPACE)
        assert all(d._contains(d.to_internal_repr(p[k])) for k, d in SPACE.items())
        x = to_unit(p, SPACE)
        assert x.shape == (len(SPACE),) and np.all((x >= 0) & (x <= 1))
        back = from_unit(x, SPACE)
        assert back["lr"] == pytest.approx(p["lr"], rel=1e-9)
        assert {k: v for k, v in back.items() if k != "lr"} == {k: v for k, v in p.items() if k != "lr"}


def test_categorical_bins_are_equal():
    d = {"c": CategoricalDistribution(["a", "b", "c", "d"])}
    got = [from_unit(np.array([u]), d)["c"] for u in (0.0, 0.249, 0.25, 0.5, 0.74, 0.75, 1.0)]
    assert got == ["a", "a", "b", "c", "c", "d", "d"]


def test_clipping_and_errors():
    lo = from_unit(np.full(len(SPACE), -3.0), SPACE)
    hi = from_unit(np.full(len(SPACE), 7.0), SPACE)
    assert (lo["w"], lo["n"], lo["m"], lo["method"]) == (-1.0, 2, 1, "ties")
    assert (hi["w"], hi["n"], hi["m"], hi["method"]) == (2.0, 12, 64, None)
    with pytest.raises(ConfigError, match="3 coordinates"):
        from_unit(np.zeros(3), SPACE)
    with pytest.raises(ConfigError, match="'lr' is missing"):
        to_unit({"w": 0.0}, SPACE)
