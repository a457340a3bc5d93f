"""Compute one resolved tensor job from a source of input tensors (a checkpoint reader or resident caches)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import torch

from mergesearch.merging.methods import get_method
from mergesearch.merging.ops import TensorGroup
from mergesearch.merging.resolve import TensorJob
from mergesearch.merging.sparsify import MagnitudeOrder, l1_by_draw, uniform_draws


class TaskVectorCache(Protocol):
    """Precomputed τ = θ_model[name] − θ_base[name] and their magnitude orders (the resident merger)."""

    base: str

    def delta(self, model: str, name: str) -> torch.Tensor: ...

    def order(self, model: str, name: str) -> MagnitudeOrder: ...

    def draws(self, shape: torch.Size, seed: int) -> torch.Tensor: ...

    def ranks(self, model: str, name: str) -> torch.Tensor: ...

    def l1_table(self, model: str, name: str, seed: int) -> torch.Tensor: ...


def job_seed(seed: int | None, name: str) -> int:
    """Seed of a tensor's random sparsifier: depends on the plan's seed and the tensor name only, so the
    result does not depend on the order in which tensors are merged."""
    return ((seed or 0) * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def run_job(job: TensorJob, tensor: Callable[[str, str], torch.Tensor], *, seed: int | None = None,
            cache: TaskVectorCache | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Merge one output tensor.

    Args:
        job: the resolved job.
        tensor: ``(model, tensor name) -> tensor`` in the working dtype.
        seed: the plan's random seed.
        cache: task vectors to reuse when the input and the base input have the same tensor name and the
            job's base is the cache's base (always, except in frankenmerges that shift layers).
        out: destination (e.g. a resident parameter); the result is written there when given.

    Returns:
        The merged tensor (``out`` itself when given).
    """
    method = get_method(job.method)
    b = job.base_index
    # Without a cache every input is read from its checkpoint: read each once per job (the base in particular
    # serves every task vector).
    if cache is None:
        read, seen = tensor, {}

        def tensor(model: str, name: str) -> torch.Tensor:
            if (model, name) not in seen:
                seen[(model, name)] = read(model, name)
            return seen[(model, name)]

    def cached(i: int) -> bool:
        return (cache is not None and b is not None and job.inputs[b][0] == cache.base
                and job.inputs[i][1] == job.inputs[b][1])

    def delta(i: int) -> torch.Tensor:
        if cached(i):
            return cache.delta(*job.inputs[i])  # type: ignore[union-attr]
        return tensor(*job.inputs[i]) - tensor(*job.inputs[b])  # type: ignore[index]

    def order(i: int) -> MagnitudeOrder | None:
        return cache.order(*job.inputs[i]) if cached(i) else None  # type: ignore[union-attr]

    def ranks(i: int) -> torch.Tensor | None:
        return cache.ranks(*job.inputs[i]) if cached(i) else None  # type: ignore[union-attr]

    # the shape from the base when there is one: reading a source tensor from a resident merger would cache it
    shape = (out if out is not None else tensor(*job.inputs[0 if b is None else b])).shape
    draws = (lambda i, s: cache.draws(shape, s)) if cache is not None else None  # type: ignore[union-attr]
    tseed = job_seed(seed, job.name)

    def l1_table(i: int) -> torch.Tensor:
        if cached(i):
            return cache.l1_table(*job.inputs[i], tseed + i)  # type: ignore[union-attr]
        return l1_by_draw(delta(i), draws(i, tseed + i) if draws else uniform_draws(shape, tseed + i))

    group = TensorGroup(job.name, len(job.inputs), b, lambda i: tensor(*job.inputs[i]), delta=delta, order=order,
                        seed=tseed, draws=draws, l1_table=l1_table, ranks=ranks, out=out, method=method.name)
    result = method.merge(group, job.shared, job.per_input)
    if out is not None and result is not out:
        out.copy_(result)
        return out
    return result
