"""The default path: RayExecutor starts a local Ray for the run and stops it on close."""

from __future__ import annotations

import pytest

from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.ray_pool import RayExecutor
from mergesearch.execution.testing import scripted_factory

from .helpers import drain

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # its own ray.init (~6-20 s here)


def test_starts_and_stops_its_own_ray() -> None:
    assert not ray.is_initialized()
    plans = [{"x": float(i), "sleep": 0.05} for i in range(6)] + [{"fail": "bad plan"}]
    with RayExecutor(scripted_factory(), workers=2, num_cpus=1, env={"OMP_NUM_THREADS": "1"}) as ex:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        remote = sorted(drain(ex, plans), key=lambda r: r.trial)
    assert not ray.is_initialized(), "the Ray instance started for the run is shut down"
    local = drain(LocalExecutor(scripted_factory()), plans)
    assert [(r.values, r.error) for r in remote] == [(r.values, r.error) for r in local]
    assert len({r.worker for r in remote}) == 2
