"""A real two-node Ray cluster on this machine (two `ray start` processes), attached by address."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from mergesearch.execution.ray_pool import RayExecutor
from mergesearch.execution.testing import scripted_factory

from .helpers import drain, free_port

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _wait_for(check, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up after {timeout:g} s")
        time.sleep(0.5)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@pytest.fixture
def cluster(monkeypatch) -> Iterator[str]:
    """Head + worker node, each a `ray start --block` in its own process group, stopped by pid afterwards.

    Not `ray stop --force`: that kills every Ray process on the machine, other users' included. Each `--block`
    process shuts its node down on SIGTERM; SIGKILL to its process group is the fallback.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # token auth would need a shared token file
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # Short and private: Ray's unix socket paths live under it (limit 107 chars), and the address file
    # (ray_current_cluster) goes there instead of /tmp/ray, where it would capture other users' ray.init.
    temp = tempfile.mkdtemp(prefix="msr", dir="/tmp")
    port = free_port()
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> None:
        log = open(os.path.join(temp, f"start{len(procs)}.log"), "w")  # noqa: SIM115 — lives with the process
        procs.append(subprocess.Popen(["ray", "start", "--block", "--node-ip-address=127.0.0.1",
                                       "--num-cpus=1", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def status() -> str:
        return subprocess.run(["ray", "status", f"--address=127.0.0.1:{port}"], env=env, capture_output=True,
                              text=True, timeout=60).stdout

    try:
        start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}",
              f"--ray-client-server-port={free_port()}")
        _wait_for(lambda: _listening(port), "head node")
        start(f"--address=127.0.0.1:{port}")
        _wait_for(lambda: re.search(r"/2\.0 CPU", status()) is not None, "second node")
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):  # stragglers of that node only
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_node_cluster_survives_killed_worker(cluster: str) -> None:
    ex = RayExecutor(scripted_factory(), workers=2, address=cluster, max_retries=2)
    try:
        nodes = ex.nodes()
        assert len(set(nodes.values())) == 2, "one worker per node (1 CPU each)"
        warmup = drain(ex, [{"x": 1.0, "sleep": 0.3}] * 4)
        assert {nodes[r.worker] for r in warmup} == set(nodes.values()), "trials ran on both nodes"
        plans = [{"x": float(i), "sleep": 0.5} for i in range(8)]
        results = drain(ex, plans, kill_first=True)
        assert sorted(r.trial for r in results) == list(range(8)), "every trial completed exactly once"
        assert all(r.ok for r in results)
        assert {r.trial: r.values["score"] for r in results} == {i: 2.0 * i for i in range(8)}
        assert next(r for r in results if r.trial == 0).attempts == 2
    finally:
        ex.close()
    assert not ray.is_initialized(), "the executor disconnects from the cluster it attached to"
