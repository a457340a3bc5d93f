"""A synthetic Worker for executor tests and benchmarks (lives in the package so Ray actors can import it).

The plan dict scripts its behaviour, so one worker pool covers every case:
``{"x": float, "sleep": seconds, "fail": reason, "nan": bool}``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

from mergesearch.errors import ModelError, TrialError
from mergesearch.execution.base import WorkerFactory


class ScriptedWorker:
    """Sleeps ``plan["sleep"]`` s then scores ``x`` in closed form: ``score = 2x``, ``cost = x²``."""

    def __init__(self, model_dir: str | None = None) -> None:
        # Mirrors the real worker's first step: a model directory missing on this node fails construction.
        if model_dir is not None and not os.path.isdir(model_dir):
            raise ModelError(f"model directory not found: {model_dir}")

    def evaluate(self, plan: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        start = time.perf_counter()
        time.sleep(float(plan.get("sleep", 0.0)))
        merged = time.perf_counter()
        if "fail" in plan:
            raise TrialError(str(plan["fail"]))
        x = float(plan.get("x", 0.0))
        score = float("nan") if plan.get("nan") else 2.0 * x
        return {"score": score, "cost": x * x}, {"merge": merged - start, "eval": time.perf_counter() - merged}


def scripted_factory(model_dir: str | None = None) -> WorkerFactory:
    """A picklable factory building a :class:`ScriptedWorker`."""
    return functools.partial(ScriptedWorker, model_dir)
