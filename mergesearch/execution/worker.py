"""The real worker: a resident merged model scored by the job's objectives.

A worker loads the base, the experts and the task vectors once (in its own process: Ray actors build it in
their constructor, from safetensors on that node's disk), then per trial applies a plan in place and scores it.

Memory options (``execution`` in the job config): ``offload_task_vectors`` keeps the task vectors in CPU memory and
streams them to the device tensor by tensor; ``share_task_vectors`` has the driver compute them once and put them in
Ray's object store (:func:`share_task_vectors`), so all the workers of a node map ONE read-only copy instead of
each holding its own. The copy is kept in the working dtype: float32 and float16 as such, bfloat16 as its int16
bits (numpy has no bfloat16), so workers use it without conversion and merges are bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from mergesearch.candidates import CandidateContext, candidate_from, objective_prompts
from mergesearch.config import JobConfig

if TYPE_CHECKING:
    import torch


class MergeWorker:
    """Applies plans to one resident model and evaluates the job's objectives on it."""

    def __init__(self, config: JobConfig,
                 shared_deltas: Mapping[tuple[str, str], torch.Tensor] | None = None) -> None:
        """Load everything; ``shared_deltas``: ``(model, tensor name) -> τ`` given to the ResidentMerger."""
        from transformers import AutoTokenizer

        from mergesearch.merging.apply import ResidentMerger
        from mergesearch.objectives import ObjectiveContext, build_objectives

        ex = config.execution
        #: torch threads of this worker's merges and scoring, set around each trial (not for the process: under
        #: the local executor the worker shares the driver's process, whose GP fits want every core)
        self.threads = ex.threads
        from mergesearch.merging.aligned import merger_models

        self.merger = ResidentMerger(
            config.base_model, merger_models(config), dtype=config.dtype, device=ex.device,
            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code,
            offload=ex.offload_task_vectors, shared_deltas=shared_deltas,
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
        self.context = CandidateContext(self.merger, self.tokenizer, objective_prompts(self.objectives),
                                        seed=config.search.seed)

    def evaluate(self, spec: dict[str, Any]) -> tuple[dict[str, float] | None, dict[str, Any]]:
        """Build the candidate ``spec`` describes (:mod:`mergesearch.candidates`; a bare plan dict is a static
        merge) on the resident model and score it, in the fidelity stages of its ``rungs`` entry if any; see
        :class:`~mergesearch.execution.base.Worker`."""
        import torch

        from mergesearch.objectives.registry import evaluate_staged

        spec = dict(spec)
        rungs = spec.pop("rungs", None)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            candidate = candidate_from(spec)
            model = candidate.build(self.context)
            t1 = time.perf_counter()
            try:
                result = evaluate_staged(self.objectives, model, self.tokenizer, rungs)
            finally:
                candidate.release(model)
            t2 = time.perf_counter()
        finally:
            torch.set_num_threads(previous)
        return result.values, {"merge": t1 - t0, "eval": t2 - t1, "rungs": result.rungs,
                               "examples": result.examples, "per_example": result.per_example}


@dataclass(frozen=True)
class MergeWorkerFactory:
    """Picklable recipe for a :class:`MergeWorker`; called inside the worker process.

    Attributes:
        config: the job.
        shared: ``(model, ObjectRef)`` pairs, each ref to ``{tensor name: numpy array}`` of that model's task
            vectors (see :func:`share_task_vectors`). The refs travel inside this small object and are resolved
            by ``ray.get`` in the actor, so a restarted actor resolves them again. Ray still logs its ray#53727
            warning ("constructor arguments in the object store"): harmless here, since these are ``ray.put``
            objects owned by the driver, pinned while the executor holds this factory (no lineage to lose).
    """

    config: JobConfig
    shared: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> MergeWorker:
        if not self.shared:
            return MergeWorker(self.config)
        import ray

        from mergesearch.merging.apply import from_numpy_bits
        from mergesearch.models import to_dtype

        dtype = to_dtype(self.config.dtype)
        deltas = {}
        for model, ref in self.shared:  # read-only numpy views of the node's object store: no copy
            deltas.update({(model, name): from_numpy_bits(a, dtype) for name, a in ray.get(ref).items()})
        return MergeWorker(self.config, shared_deltas=deltas)


def share_task_vectors(factory: MergeWorkerFactory) -> MergeWorkerFactory:
    """Compute the job's task vectors once, here (the driver, Ray running), and put them in the object store.

    One object per source model, so the driver holds one model's task vectors at a time. Every node running
    workers fetches each object once; its workers share that copy. The driver needs the models at the job's paths.

    Returns:
        ``factory`` with ``shared`` set.

    Raises:
        ModelError: a model the driver cannot read, or incompatible with the base.
    """
    import ray

    from mergesearch.merging.apply import task_vectors, to_numpy_bits
    from mergesearch.models import Checkpoint, check_compatible, to_dtype

    config = factory.config
    base = Checkpoint(config.base_model, allow_pickle=config.allow_pickle)
    refs = []
    from mergesearch.merging.aligned import merger_models

    for model in merger_models(config):
        if model == config.base_model:
            continue
        ck = Checkpoint(model, allow_pickle=config.allow_pickle)
        check_compatible(base, ck)
        tv = task_vectors(base, ck, to_dtype(config.dtype))
        refs.append((model, ray.put({name: to_numpy_bits(t) for name, t in tv.items()})))
    return replace(factory, shared=tuple(refs))
