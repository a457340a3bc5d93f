"""The fast path of the search: merge into one resident model, in place, reusing cached task vectors.

``ResidentMerger`` reads the base and the sources once, keeps τi = θi − θ0 for every source tensor, and writes
each plan's merged weights straight into the parameters of one ``AutoModelForCausalLM`` (no reload, no disk).
Magnitude sparsifiers (TIES, breadcrumbs) sort |τ| of a tensor once, the first time it is needed, so merging at
a new density is an index lookup plus one fused pass. DARE keeps its int16 draws and, per (tensor, input), the
cumulative ‖τ‖₁ by draw value, so its L1 rescale at any density is a lookup too; both are reused while the
plan's ``random_seed`` stays the same (the search fixes it per study). DELLA keeps its per-row ranks.
Plans that change the layer count (``slices``) draw decoder layers from a pool of modules. ``apply(plan)``
gives the same weights as ``merge_config`` for the plan.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesearch.errors import ConfigError
from mergesearch.merging.engine import run_job
from mergesearch.merging.plan import MergePlan
from mergesearch.merging.resolve import plan_models, resolve
from mergesearch.merging.sparsify import MagnitudeOrder, della_rank_norm, l1_by_draw, uniform_draws
from mergesearch.models import Checkpoint, check_compatible, layer_key, to_dtype


class ResidentMerger:
    """One resident model plus cached base tensors and task vectors; ``apply`` re-merges it in place.

    Args:
        base: the base model (path or hub id); plans must name models by the same strings.
        models: the source (fine-tuned) models.
        dtype: working and model dtype.
        device: where the model and caches live.
        allow_pickle, trust_remote_code: as for loading any checkpoint.

    Attributes:
        model: the resident ``PreTrainedModel``; ``apply`` returns it.
        base_state: tensor name -> base tensor (read-only; e.g. for cost objectives).
        num_layers: the base's layer count.
        tensor_names: the base's tensor names, in checkpoint order.
        tokenizer_path: directory of the base's tokenizer files.
    """

    def __init__(self, base: str, models: list[str], *, dtype: str = "float32", device: str = "cpu",
                 allow_pickle: bool = False, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM

        self.base = base
        self.models = [m for m in dict.fromkeys(models) if m != base]
        self.dtype = to_dtype(dtype)
        self.device = device
        self.checkpoints = {m: Checkpoint(m, allow_pickle=allow_pickle) for m in [base, *self.models]}
        for m in self.models:
            check_compatible(self.checkpoints[base], self.checkpoints[m])
        ck = self.checkpoints[base]
        self.tensor_names = list(ck.shapes)
        self.num_layers = ck.num_layers
        self.tokenizer_path: Path = ck.path
        with torch.no_grad():
            self.base_state = {n: ck.get(n, self.dtype, device) for n in self.tensor_names}
            self._deltas = {(m, n): self.checkpoints[m].get(n, self.dtype, device) - self.base_state[n]
                            for m in self.models for n in self.tensor_names}
        self._orders: dict[tuple[str, str], MagnitudeOrder] = {}
        self._raw: dict[tuple[str, str], torch.Tensor] = {}
        self._draws: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
        self._draws_seed: int | None = None
        self._ranks: dict[tuple[str, str], torch.Tensor] = {}
        self._l1: dict[tuple[str, str, int], torch.Tensor] = {}
        self._tokenizer: Any = None
        self.model = AutoModelForCausalLM.from_pretrained(ck.path, dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code).to(device).eval()
        self.model.requires_grad_(False)
        self._layers_path = self._find_layers_path()
        self._pool: list[nn.Module] = list(self.model.get_submodule(self._layers_path)) if self._layers_path else []
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        self._layer_types = list(getattr(cfg, "layer_types", None) or [])

    # -- caches the engine reads (TaskVectorCache protocol) ------------------------------------------------

    def delta(self, model: str, name: str) -> torch.Tensor:
        """τ = θ_model[name] − θ_base[name] (cached)."""
        return self._deltas[(model, name)]

    def order(self, model: str, name: str) -> MagnitudeOrder:
        """Sorted |τ| of one tensor, computed on first use."""
        key = (model, name)
        if key not in self._orders:
            self._orders[key] = MagnitudeOrder(self._deltas[key])
        return self._orders[key]

    def ranks(self, model: str, name: str) -> torch.Tensor:
        """DELLA's normalized row ranks of |τ| (computed on first use)."""
        key = (model, name)
        if key not in self._ranks:
            self._ranks[key] = della_rank_norm(self._deltas[key])
        return self._ranks[key]

    def draws(self, shape: torch.Size, seed: int) -> torch.Tensor:
        """DARE's uniform draws for one (tensor, input, plan seed), kept until a plan with another seed."""
        key = (seed, tuple(shape))
        if key not in self._draws:
            self._draws[key] = uniform_draws(shape, seed).to(self.device)
        return self._draws[key]

    def l1_table(self, model: str, name: str, seed: int) -> torch.Tensor:
        """DARE's cumulative ‖τ‖₁ by draw (:func:`l1_by_draw`), kept like the draws until the plan seed changes."""
        key = (model, name, seed)
        if key not in self._l1:
            delta = self._deltas[(model, name)]
            self._l1[key] = l1_by_draw(delta, self.draws(delta.shape, seed))
        return self._l1[key]

    def tensor(self, model: str, name: str) -> torch.Tensor:
        """θ_model[name] in the working dtype (sources are read from disk on first use, then kept)."""
        if model == self.base:
            return self.base_state[name]
        key = (model, name)
        if key not in self._raw:
            if model not in self.checkpoints:
                raise ConfigError(f"model {model!r} in the plan was not loaded by this merger "
                                  f"(loaded: {[self.base, *self.models]})")
            self._raw[key] = self.checkpoints[model].get(name, self.dtype, self.device)
        return self._raw[key]

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
        with torch.no_grad():
            for job in resolved.jobs:
                run_job(job, self.tensor, seed=plan.random_seed, cache=self, out=self._target(job.name))
        return self.model

    def _find_layers_path(self) -> str | None:
        for name in self.tensor_names:
            key, layer = layer_key(name)
            if layer is not None:
                return key.split(".{}", 1)[0]
        return None

    def _target(self, name: str) -> torch.Tensor:
        key, layer = layer_key(name)
        if layer is None:
            module, attr = self.model, name
        else:
            module, attr = self._pool[layer], key.split("{}.", 1)[1]
        try:
            return module.get_parameter(attr).data
        except AttributeError:
            return module.get_buffer(attr)

    def _set_layers(self, source_layers: list[int]) -> None:
        """Make the model's decoder stack ``len(source_layers)`` modules long (growing the pool as needed)."""
        if self._layers_path is None:
            return
        n = len(source_layers)
        while len(self._pool) < n:
            self._pool.append(copy.deepcopy(self._pool[0]))
        parent_path, _, attr = self._layers_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        current = list(getattr(parent, attr))
        if len(current) != n or any(a is not b for a, b in zip(current, self._pool, strict=False)):
            setattr(parent, attr, nn.ModuleList(self._pool[:n]))
        for i, layer in enumerate(self._pool[:n]):
            for sub in layer.modules():  # caches index their per-layer state by layer_idx
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = i
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        cfg.num_hidden_layers = n
        if self._layer_types:
            cfg.layer_types = [self._layer_types[min(s, len(self._layer_types) - 1)] for s in source_layers]
