"""ResidentMerger memory options: offloaded task vectors and shared (read-only, zero-copy) task vectors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesearch.errors import ModelError
from mergesearch.merging import sparsify as sp
from mergesearch.merging.apply import ResidentMerger, from_numpy_bits, to_numpy_bits
from mergesearch.merging.plan import MergePlan

METHODS = ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della"]


def plan(m: dict[str, Path], method: str, density: float, seed: int = 3) -> MergePlan:
    def params(weight: float, d: float) -> dict:
        return {"weight": weight} if method == "task_arithmetic" else {"weight": weight, "density": d}

    shared = {"epsilon": 0.05} if method == "della" else {}
    return MergePlan.model_validate({
        "merge_method": method, "base_model": str(m["base"]), "dtype": "float32", "random_seed": seed,
        "parameters": shared,
        "models": [{"model": str(m["a"]), "parameters": params(0.6, density)},
                   {"model": str(m["b"]), "parameters": params(0.5, density)},
                   {"model": str(m["c"]), "parameters": params(0.3, 0.8)}]})


def weights(merger: ResidentMerger, p: MergePlan) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in merger.apply(p).state_dict().items()}


@pytest.fixture(scope="module")
def mergers(tiny_models) -> tuple[ResidentMerger, ResidentMerger]:
    args = (str(tiny_models["base"]), [str(tiny_models[k]) for k in "abc"])
    return ResidentMerger(*args), ResidentMerger(*args, offload=True)


@pytest.mark.parametrize("method", METHODS)
def test_offload_is_bit_identical(tiny_models, mergers, method):
    plain, offloaded = mergers
    for density, seed in ((0.4, 3), (0.7, 3), (0.4, 5)):  # cached orders/draws reused, then a new seed
        p = plan(tiny_models, method, density, seed)
        ref, got = weights(plain, p), weights(offloaded, p)
        assert ref.keys() == got.keys()
        for k, v in ref.items():
            assert torch.equal(got[k], v), (method, density, seed, k)
    assert not offloaded._staged, "no per-tensor device copies outlive apply()"
    caches = [offloaded._deltas, offloaded._ranks, offloaded._draws, offloaded._l1]
    assert all(t.device.type == "cpu" for c in caches for t in c.values())
    # compact: counts by key (or a small tensor's sort), no copy of τ to offload
    assert all(o.nbytes <= max(6 << 15, 4 * sp.SMALL) and o.keys.device.type == "cpu"
               for o in offloaded._orders.values())
    if method in ("ties", "breadcrumbs"):
        assert offloaded._orders
    if method == "dare_ties":
        assert offloaded._l1 and offloaded._draws


def test_shared_deltas_are_used_zero_copy(tiny_models, mergers):
    plain, _ = mergers
    # what a worker gets back from Ray's object store: read-only numpy buffers of the task vectors
    arrays = {key: to_numpy_bits(t.clone()) for key, t in plain._deltas.items()}
    for a in arrays.values():
        a.flags.writeable = False
    shared = {key: from_numpy_bits(a, torch.float32) for key, a in arrays.items()}
    merger = ResidentMerger(plain.base, plain.models, shared_deltas=shared)
    assert all(merger._deltas[k].data_ptr() == shared[k].data_ptr() for k in shared), "taken without a copy"
    for method in ("ties", "dare_ties"):
        p = plan(tiny_models, method, 0.5)
        ref, got = weights(plain, p), weights(merger, p)
        assert all(torch.equal(got[k], v) for k, v in ref.items()), method
    assert all(not a.flags.writeable for a in arrays.values())

    missing = dict(shared)
    key = next(iter(missing))
    del missing[key]
    with pytest.raises(ModelError, match=r"shared task vector .* missing"):
        ResidentMerger(plain.base, plain.models, shared_deltas=missing)
    wrong = dict(shared)
    wrong[key] = shared[key].double()
    with pytest.raises(ModelError, match=re.escape(f"tensor '{key[1]}'")):
        ResidentMerger(plain.base, plain.models, shared_deltas=wrong)


def test_numpy_bits_round_trip_bfloat16():
    t = torch.randn(5, 3).to(torch.bfloat16)
    a = to_numpy_bits(t)
    assert a.dtype == np.int16
    back = from_numpy_bits(a, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.equal(back, t) and back.data_ptr() == t.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_bounds_gpu_memory(tiny_models):
    args = (str(tiny_models["base"]), [str(tiny_models[k]) for k in "abc"])
    p = plan(tiny_models, "ties", 0.5)
    peaks = {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        merger = ResidentMerger(*args, device="cuda", offload=offload)
        merger.apply(p)
        torch.cuda.synchronize()
        peaks[offload] = torch.cuda.max_memory_allocated()
        if offload:
            assert all(t.is_pinned() for t in merger._deltas.values())
        del merger
    largest = max(t.numel() for t in ResidentMerger(*args)._deltas.values()) * 4
    deltas = sum(t.numel() for t in ResidentMerger(*args)._deltas.values()) * 4
    # offloaded: the model, base tensors and a few tensors' worth of caches, not all the task vectors
    assert peaks[True] < peaks[False] - deltas + 16 * largest
