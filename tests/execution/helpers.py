"""Test helpers shared by the executor tests: the minimal driver loop and Ray plumbing."""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from mergesearch.execution.base import Executor, TrialResult


def drain(ex: Executor, plans: list[dict[str, Any]], kill_first: bool = False) -> list[TrialResult]:
    """Run every plan (trial number = index) with the driver's loop: submit to idle workers, collect.

    With ``kill_first``, SIGKILL the worker process holding trial 0 as soon as it is running.
    """
    results: list[TrialResult] = []
    nxt = 0
    deadline = time.monotonic() + 60
    while len(results) < len(plans):
        assert time.monotonic() < deadline, f"only {len(results)} of {len(plans)} results within 60 s"
        while ex.idle() and nxt < len(plans):
            ex.submit(nxt, plans[nxt])
            nxt += 1
        if kill_first and 0 in ex.running():
            time.sleep(0.15)  # let the actor start the trial: killed mid-trial, not before it arrives
            kill_worker(ex.running()[0])
            kill_first = False
        results.extend(ex.completed(timeout=0.1 if kill_first else 5.0))
    return results


def kill_worker(worker: str) -> int:
    """SIGKILL a worker process given its id ``"ip:pid"``; returns the pid."""
    pid = int(worker.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    return pid


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
