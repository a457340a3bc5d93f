"""The fast path of the search: merge into one resident model, in place, reusing cached task vectors.

``ResidentMerger`` reads the base and the sources once, keeps τi = θi − θ0 for every source tensor, and writes
each plan's merged weights straight into the parameters of one ``AutoModelForCausalLM`` (no reload, no disk).
Magnitude sparsifiers (TIES, breadcrumbs) count |τ| of a tensor by the top bits of its pattern once, the first time
it is needed (:class:`~mergesearch.merging.sparsify.MagnitudeOrder`: one pass, a few KiB a tensor), so merging at a
new density is a lookup (bfloat16/float16) or one gathering pass (float32) plus one fused pass. DARE keeps its
int16 draws and, per (tensor, input), the cumulative ‖τ‖₁ by draw value, so its L1 rescale at any density is a
lookup too; both are reused while the plan's ``random_seed`` stays the same (the search fixes it per study). DELLA
keeps its per-row ranks as uint16.

Memory (CPU, no offload): the base tensors, N task vectors and the resident model, each once in the working dtype,
plus those caches; the resident model's weights are copies of the base tensors, not views of the memory-mapped
checkpoint (see ``_own_weights``). With ``offload=True`` the task vectors and the per-tensor caches derived from
them live in CPU memory (pinned when merging on CUDA) and each tensor's entries are copied to the device only
while that tensor is merged, so the device holds the resident model, the base tensors and one tensor's worth of
task vectors. With ``shared_deltas`` the task vectors are not computed but taken as given, e.g. zero-copy views
of one read-only copy in Ray's object store shared by every worker of a node (see :func:`task_vectors`); they are
never written to. Plans that change the layer count (``slices``) draw decoder layers from a pool of modules.
``apply(plan)`` gives the same weights as ``merge_config`` for the plan.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mergesearch.errors import ConfigError, ModelError
from mergesearch.merging.engine import run_job
from mergesearch.merging.plan import MergePlan
from mergesearch.merging.resolve import TensorJob, plan_models, resolve
from mergesearch.merging.sparsify import MagnitudeOrder, della_ranks, l1_by_draw, uniform_draws
from mergesearch.merging.threads import kernel_threads
from mergesearch.models import Checkpoint, check_compatible, layer_key, to_dtype

#: numpy dtype holding a working dtype's bits (numpy has no bfloat16: its bits travel as int16).
_NUMPY_BITS = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def task_vectors(base: Checkpoint, model: Checkpoint, dtype: torch.dtype, device: str = "cpu",
                 base_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """τ = θ_model − θ_base of every floating-point tensor of ``base``, in ``dtype`` (shapes as in the checkpoints).

    Args:
        base_state: the base's tensors already read in ``dtype`` on ``device`` (saves reading them again).
    """
    return {n: task_vector(base, model, n, dtype, device, base_state)
            for n in base.shapes if n not in base.integer}


def task_vector(base: Checkpoint, model: Checkpoint, name: str, dtype: torch.dtype, device: str = "cpu",
                base_state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """τ = θ_model[name] − θ_base[name] in ``dtype`` (one rounding), shape of the tensor; see :func:`task_vectors`."""
    with torch.no_grad():
        theta0 = base_state[name] if base_state is not None else base.get(name, dtype, device)
        theta = model.get(name, dtype, device)
        if model.read_copies(name, dtype, device):
            # our own copy: τ takes its memory, so nothing is freed. Freed blocks of a size the allocator keeps
            # in its heap (after large frees, e.g. from_pretrained's) pile up as holes that later tensors
            # reuse only in part: measured, 20-30 % of the task vectors' size on top of them.
            return theta.sub_(theta0)
        return theta - theta0  # a view of the file: never written


def to_numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array of the same bits (float32, float16, or int16 for bfloat16), zero-copy."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def from_numpy_bits(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_numpy_bits`, zero-copy; ``a`` may be read-only (the tensor must never be written)."""
    with warnings.catch_warnings():  # torch warns on read-only arrays; nothing here writes to task vectors
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(a)
    return t.view(dtype) if t.dtype != dtype else t


class ResidentMerger:
    """One resident model plus cached base tensors and task vectors; ``apply`` re-merges it in place.

    Args:
        base: the base model (path or hub id); plans must name models by the same strings.
        models: the source (fine-tuned) models.
        dtype: working and model dtype.
        device: where the model and the base tensors live (and the caches, unless ``offload``).
        allow_pickle, trust_remote_code: as for loading any checkpoint.
        offload: keep task vectors, magnitude orders, DARE draws and L1 tables, DELLA ranks and raw source
            tensors in CPU memory (pinned when ``device`` is CUDA) and stream each tensor's share to ``device``
            while that tensor is merged. Merges are bit-identical to ``offload=False``.
        shared_deltas: ``(model, tensor name) -> τ`` (CPU, shape of the tensor, working dtype) for every source
            and tensor, used instead of computing them — e.g. zero-copy read-only views of Ray's object store.
            Kept as given (no copy) when the caches live in CPU memory; never written to.

    Attributes:
        model: the resident ``PreTrainedModel``; ``apply`` returns it.
        base_state: tensor name -> base tensor (read-only; e.g. for cost objectives).
        num_layers: the base's layer count.
        tensor_names: the base's tensor names, in checkpoint order.
        tokenizer_path: directory of the base's tokenizer files.
        layer_map: after ``apply``, the base layer each output decoder layer stands for (also stored on the
            model as ``mergesearch_source_layers``, which ``l1_from_base``/``nonzero_delta`` read).

    Raises:
        ModelError: incompatible checkpoints, or ``shared_deltas`` missing a tensor or of the wrong shape/dtype.
    """

    def __init__(self, base: str, models: list[str], *, dtype: str = "float32", device: str = "cpu",
                 allow_pickle: bool = False, trust_remote_code: bool = False, offload: bool = False,
                 shared_deltas: Mapping[tuple[str, str], torch.Tensor] | None = None):
        from transformers import AutoModelForCausalLM

        self.base = base
        self.models = [m for m in dict.fromkeys(models) if m != base]
        self.dtype = to_dtype(dtype)
        self.device = device
        self.offload = offload
        # Where the caches live: the device, or CPU memory under offload (pinned so device copies can overlap).
        self._home = "cpu" if offload else device
        self._pin = offload and torch.device(device).type == "cuda" and torch.cuda.is_available()
        self._staged: dict[tuple[str, Any], torch.Tensor] = {}  # this tensor job's device copies (offload)
        self.checkpoints = {m: Checkpoint(m, allow_pickle=allow_pickle) for m in [base, *self.models]}
        for m in self.models:
            check_compatible(self.checkpoints[base], self.checkpoints[m])
        ck = self.checkpoints[base]
        self.tensor_names = list(ck.shapes)
        self.num_layers = ck.num_layers
        self.tokenizer_path: Path = ck.path
        # The model first, while the process is small: converting a checkpoint to another dtype costs
        # from_pretrained a transient several times the model, and what it frees is reused by the tensors below.
        self.model = AutoModelForCausalLM.from_pretrained(ck.path, dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code)
        with torch.no_grad():
            self.base_state = {n: ck.get(n, self.dtype, device) for n in self.tensor_names}
        self._own_weights()
        self.model.to(device).eval()
        self.model.requires_grad_(False)
        # τ are computed and stored one tensor at a time: no model's whole set exists twice (e.g. before pinning)
        same_home = torch.device(self._home) == torch.device(device)
        self._deltas: dict[tuple[str, str], torch.Tensor] = {}
        for m in self.models:
            for n in self.tensor_names:
                if n in ck.integer:  # buffers are copied, never merged (resolve): no task vector
                    continue
                if shared_deltas is not None:  # not pinned: that would copy them out of the shared buffer
                    self._deltas[(m, n)] = self._store(self._shared(shared_deltas, m, n), pin=False)
                else:
                    self._deltas[(m, n)] = self._store(task_vector(
                        ck, self.checkpoints[m], n, self.dtype, self._home, self.base_state if same_home else None))
        self._orders: dict[tuple[str, str], MagnitudeOrder] = {}  # counts of |τ| by key (a few KiB a tensor)
        self._raw: dict[tuple[str, str], torch.Tensor] = {}
        self._draws: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self._draws_seed: int | None = None
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}  # DELLA's row ranks, uint16
        self._l1: dict[tuple[str, str, int], torch.Tensor] = {}
        self._tokenizer: Any = None
        self._layers_path = self._find_layers_path()
        self._pool: list[nn.Module] = list(self.model.get_submodule(self._layers_path)) if self._layers_path else []
        self._targets: dict[str, tuple[nn.Module, str] | None] = {}  # tensor name -> (owning module, attribute)
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        self._layer_types = list(getattr(cfg, "layer_types", None) or [])

    def _own_weights(self) -> None:
        """Give the resident model's weights that are views of the checkpoint file memory of their own.

        ``from_pretrained`` leaves weights stored in the working dtype as views of the memory-mapped checkpoint,
        untouched until used. Written in place by the first merge, each page would be copied while the file's page
        stays mapped, and both count as the process's memory: the model twice over. ``base_state`` holds the same
        values (the checkpoint cast to the working dtype) already on the device, so they are copied from there,
        without reading the file again. Weights stored in another dtype were converted, hence copied, by
        ``from_pretrained`` and are left as they are, as are tensors the architecture keeps in another dtype or
        that are not found by name. The Parameter objects stay (tied weights keep sharing one).
        """
        ck = self.checkpoints[self.base]
        with torch.no_grad():
            for name in self.tensor_names:
                if ck.read_copies(name, self.dtype):  # from_pretrained reads on the CPU, like get(name, dtype)
                    continue
                module_path, _, attr = name.rpartition(".")
                try:
                    module = self.model.get_submodule(module_path)
                except AttributeError:
                    continue
                current = getattr(module, attr, None)
                value = self.base_state[name]
                if not isinstance(current, torch.Tensor) or current.dtype != value.dtype \
                        or current.shape != value.shape:
                    continue
                if isinstance(current, nn.Parameter):
                    current.data = value.clone()
                elif attr in module._buffers:
                    module._buffers[attr] = value.clone()

    def _shared(self, shared: Mapping[tuple[str, str], torch.Tensor], model: str, name: str) -> torch.Tensor:
        t = shared.get((model, name))
        shape = tuple(self.checkpoints[self.base].shapes[name])
        if t is None or tuple(t.shape) != shape or t.dtype != self.dtype:
            got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise ModelError(f"shared task vector of {model!r} tensor {name!r}: expected {shape} {self.dtype}, "
                             f"got {got}")
        return t

    def _store(self, t: torch.Tensor, pin: bool = True) -> torch.Tensor:
        """A cache entry in its home: as is on the device, or in (pinned) CPU memory under offload."""
        if pin and self._pin and not t.is_pinned():  # one copy straight into page-locked memory
            return torch.empty_like(t, device="cpu", pin_memory=True).copy_(t)
        return t if t.device == torch.device(self._home) else t.to(self._home)

    def _fetch(self, kind: str, key: Any, value: torch.Tensor) -> torch.Tensor:
        """``value`` on the merge device; under offload a copy kept only until the next tensor job."""
        if not self.offload:
            return value
        staged = self._staged.get((kind, key))
        if staged is None:
            staged = self._staged[(kind, key)] = value.to(self.device, non_blocking=True)
        return staged

    def _cached(self, kind: str, store: dict, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``store[key]`` on the merge device, computed there on first use (then kept in its home)."""
        if key not in store:
            value = compute()
            if self.offload:
                self._staged[(kind, key)] = value
            store[key] = self._store(value)
        return self._fetch(kind, key, store[key])

    # -- caches the engine reads (TaskVectorCache protocol); tensors returned are on ``device`` -------------

    def delta(self, model: str, name: str) -> torch.Tensor:
        """τ = θ_model[name] − θ_base[name] (cached)."""
        return self._fetch("delta", (model, name), self._deltas[(model, name)])

    def order(self, model: str, name: str) -> MagnitudeOrder:
        """The magnitude order of one task vector (computed on first use; tiny, so it lives on the merge device)."""
        key = (model, name)
        if key not in self._orders:
            self._orders[key] = MagnitudeOrder(self.delta(*key))
        return self._orders[key]

    def ranks(self, model: str, name: str) -> torch.Tensor:
        """DELLA's row ranks of |τ| (:func:`della_ranks`: uint16, computed on first use)."""
        key = (model, name)
        return self._cached("ranks", self._ranks, key, lambda: della_ranks(self.delta(*key)))

    def draws(self, shape: torch.Size, seed: int) -> torch.Tensor:
        """DARE's uniform draws for one (tensor, input, plan seed), kept until a plan with another seed."""
        key = (seed, tuple(shape))
        return self._cached("draws", self._draws, key, lambda: uniform_draws(shape, seed).to(self.device))

    def l1_table(self, model: str, name: str, seed: int) -> torch.Tensor:
        """DARE's cumulative ‖τ‖₁ by draw (:func:`l1_by_draw`), kept like the draws until the plan seed changes."""

        def compute() -> torch.Tensor:
            delta = self.delta(model, name)
            return l1_by_draw(delta, self.draws(delta.shape, seed))

        return self._cached("l1", self._l1, (model, name, seed), compute)

    def tensor(self, model: str, name: str) -> torch.Tensor:
        """θ_model[name] in the working dtype (sources are read from disk on first use, then kept)."""
        if model == self.base:
            return self.base_state[name]
        if model not in self.checkpoints:
            raise ConfigError(f"model {model!r} in the plan was not loaded by this merger "
                              f"(loaded: {[self.base, *self.models]})")
        # Stored in the working dtype, a source tensor stays a read-only view of the memory-mapped file: pages the
        # kernel may drop under pressure and that workers on one node share. A private copy read 1.4-1.7x faster
        # (float32 ``linear``, 134M entries, apply_side_by_side.linear_copies_t1.json / _t2.json) but, held per
        # worker and never reclaimable, it would turn N source models of page cache into N models of RAM in each.
        return self._cached("raw", self._raw, (model, name),
                            lambda: self.checkpoints[model].get(name, self.dtype, self.device))

    @property
    def tokenizer(self) -> Any:
        """The base's tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    # -- applying a plan --------------------------------------------------------------------------------

    def apply(self, plan: MergePlan) -> nn.Module:
        """Write the plan's merged weights into the resident model and return it.

        Raises:
            ConfigError: a plan naming a model this merger did not load, or any plan error (see ``resolve``).
        """
        unknown = [m for m in plan_models(plan) if m not in self.checkpoints]
        if unknown:
            raise ConfigError(f"model {unknown[0]!r} in the plan was not loaded by this merger "
                              f"(loaded: {[self.base, *self.models]})")
        resolved = resolve(plan, self.checkpoints, self.base)
        if plan.random_seed != self._draws_seed:  # draws are only reused within one plan seed
            self._draws.clear()
            self._l1.clear()
            self._draws_seed = plan.random_seed
        self._set_layers([src_layer for _, src_layer in resolved.layer_map])
        # output layer i stands for base layer layer_map[i] (cost objectives compare by it; read-only)
        self.layer_map = tuple(src_layer for _, src_layer in resolved.layer_map)
        self.model.mergesearch_source_layers = self.layer_map
        try:
            self._run_jobs(resolved.jobs, plan.random_seed)
        finally:
            self._staged.clear()
        return self.model

    def _run_jobs(self, jobs: Sequence[TensorJob], seed: int | None) -> None:
        """Merge every job into the resident model. On the CPU with several threads (``kernel_threads``) the jobs
        run side by side, a whole tensor per worker on one thread: each tensor's Python work then overlaps
        another's compiled pass, where splitting each pass over the threads left the cores idle during it
        (float32 ties 1.36–1.45× and della 1.25–1.37× faster on 2 threads in two runs of
        benchmarks/apply_side_by_side.py). A job's result does not depend on how many threads run it, so the bits
        are the same."""
        workers = kernel_threads() if not self.offload and torch.device(self.device).type == "cpu" else 1
        placed = [(job, target) for job in jobs if (target := self._target(job.name)) is not None]
        jobs, targets = [job for job, _ in placed], [target for _, target in placed]
        # tied weights are one tensor: jobs writing it run in plan order (the last one wins), as one worker would
        if workers < 2 or len(jobs) < 2 or len({t.data_ptr() for t in targets}) < len(targets):
            with torch.no_grad():
                for job, target in zip(jobs, targets, strict=True):
                    self._staged.clear()  # under offload: the device holds one tensor's caches at a time
                    run_job(job, self.tensor, seed=seed, cache=self, out=target)
            return

        from mergesearch.merging import kernels  # numba: on the CPU path only

        kernels.run_side_by_side(  # largest first, so the workers finish together
            [functools.partial(run_job, job, self.tensor, seed=seed, cache=self, out=target)
             for job, target in zip(jobs, targets, strict=True)],
            workers, start=sorted(range(len(jobs)), key=lambda i: -targets[i].numel()))

    def _find_layers_path(self) -> str | None:
        for name in self.tensor_names:
            key, layer = layer_key(name)
            if layer is not None:
                return key.split(".{}", 1)[0]
        return None

    def _target(self, name: str) -> torch.Tensor | None:
        """The resident tensor a job writes: found by name once (the pool's layer i always stands at position i),
        then read from its module's table (tens of µs per apply otherwise, serial before the workers start).

        None for a checkpoint tensor the model has no place for, which ``from_pretrained`` ignored too (e.g. the
        per-layer ``rotary_emb.inv_freq`` older Llama checkpoints store): it cannot change the model.
        """
        if name not in self._targets:
            key, layer = layer_key(name)
            module, path = (self.model, name) if layer is None else (self._pool[layer], key.split("{}.", 1)[1])
            owner, _, attr = path.rpartition(".")
            try:
                sub = module.get_submodule(owner)
            except AttributeError:
                sub = None
            known = sub is not None and (attr in sub._parameters or attr in sub._buffers)
            self._targets[name] = (sub, attr) if known else None
        where = self._targets[name]
        if where is None:
            return None
        owner, attr = where
        p = owner._parameters.get(attr)
        return p.data if p is not None else owner._buffers[attr]

    def _set_layers(self, source_layers: list[int]) -> None:
        """Make the model's decoder stack ``len(source_layers)`` modules long (growing the pool as needed)."""
        if self._layers_path is None:
            return
        n = len(source_layers)
        while len(self._pool) < n:
            layer = copy.deepcopy(self._pool[0])
            for sub in layer.modules():  # caches index their per-layer state by layer_idx (a copy says 0)
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(self._pool)
            self._pool.append(layer)
        parent_path, _, attr = self._layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        current = list(getattr(parent, attr))
        if len(current) != n or any(a is not b for a, b in zip(current, self._pool, strict=False)):
            setattr(parent, attr, nn.ModuleList(self._pool[:n]))
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        cfg.num_hidden_layers = n
        if self._layer_types:
            cfg.layer_types = [self._layer_types[min(s, len(self._layer_types) - 1)] for s in source_layers]
