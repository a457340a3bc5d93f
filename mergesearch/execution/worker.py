"""The real worker: a resident merged model scored by the job's objectives.

A worker loads the base, the experts and the task vectors once (in its own process: Ray actors build it in
their constructor, from safetensors on that node's disk), then per trial applies a plan in place and scores it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mergesearch.config import JobConfig


class MergeWorker:
    """Applies plans to one resident model and evaluates the job's objectives on it."""

    def __init__(self, config: JobConfig) -> None:
        import torch
        from transformers import AutoTokenizer

        from mergesearch.merging.apply import ResidentMerger
        from mergesearch.objectives import ObjectiveContext, build_objectives

        torch.set_num_threads(config.execution.threads)
        ex = config.execution
        self.merger = ResidentMerger(
            config.base_model, list(config.models), dtype=config.dtype, device=ex.device,
            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code,
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                config.base_model, trust_remote_code=config.trust_remote_code
            )
        except Exception as e:  # missing or broken tokenizer files: transformers raises OSError or ValueError
            from mergesearch.errors import ModelError

            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ModelError(f"model {config.base_model!r}: cannot load its tokenizer ({reason})") from None
        context = ObjectiveContext(base_state=self.merger.base_state, device=ex.device, split="search")
        self.objectives = build_objectives(config.objectives, context)

    def evaluate(self, plan: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """Merge ``plan`` into the resident model and score it; see :class:`~mergesearch.execution.base.Worker`."""
        from mergesearch.merging.plan import MergePlan
        from mergesearch.objectives import evaluate

        t0 = time.perf_counter()
        model = self.merger.apply(MergePlan.model_validate(plan))
        t1 = time.perf_counter()
        values = evaluate(self.objectives, model, self.tokenizer)
        t2 = time.perf_counter()
        return values, {"merge": t1 - t0, "eval": t2 - t1}


@dataclass(frozen=True)
class MergeWorkerFactory:
    """Picklable recipe for a :class:`MergeWorker`; called inside the worker process."""

    config: JobConfig

    def __call__(self) -> MergeWorker:
        return MergeWorker(self.config)
