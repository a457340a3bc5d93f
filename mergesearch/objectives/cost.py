"""Cost objectives: distance from the base (sparsity of the merge), size, depth and speed of the merged model.

``l1_from_base`` and ``nonzero_delta`` compare the merged model with the base **layer by the base layer it
stands for**, not by tensor name, so a plan that drops, repeats or reorders layers is measured correctly:

- Tensors outside the decoder layers (embeddings, final norm, head) are compared with the base tensor of the
  same name and shape.
- Output layer ``i`` stands for base layer ``s_i``: the ``layer_map`` of the applied plan, which
  :class:`~mergesearch.merging.apply.ResidentMerger` stores on the model as ``mergesearch_source_layers``
  (for a model without it, e.g. a saved directory: ``s_i = i``).
- The distance views the network as a stack of residual blocks, where a block whose weights are all zero adds
  nothing (an identity). Dropping base layer ``s`` is therefore the base with that block's weights zeroed: a
  dropped layer counts its base tensors in full (``Σ|θ0|``; every non-zero entry changed). Symmetrically, a
  layer inserted into the base counts its own tensors in full (``Σ|θ|``).
- A base layer that several output layers stand for (a repeated depth) is paired with the one copy that makes
  the total smallest; the other copies count as inserted layers. A base layer no output layer stands for counts
  as dropped. Tensors with no base counterpart of the same shape are skipped, as before.

So a plan never scores a lower distance by deleting a layer than by keeping that layer as the base's copy (which
costs 0), and the base itself costs 0 however it is laid out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field as PydField

from mergesearch.models import layer_key
from mergesearch.objectives.base import Direction, ObjectiveBase, Params
from mergesearch.objectives.scoring import model_device

#: attribute of a model holding, per output decoder layer, the base layer it stands for (set by ResidentMerger)
SOURCE_LAYERS_ATTR = "mergesearch_source_layers"


def static_part(model: Any) -> Any:
    """The one static model inside a candidate's model: itself, or a routed family's ``shared`` model.

    Distances from the base measure this part; what a family adds around it (low-rank experts, a router) is
    counted by ``extra_params``.
    """
    return getattr(model, "shared", model)


def source_layers(model: Any, n_layers: int) -> list[int]:
    """The base layer each of the model's ``n_layers`` decoder layers stands for (identity when not recorded)."""
    found = getattr(model, SOURCE_LAYERS_ATTR, None)
    if found is not None and len(found) == n_layers:
        return [int(s) for s in found]
    return list(range(n_layers))


#: a per-pair measure: (model tensor or None for a dropped layer, base tensor or None for an inserted one) -> value
Measure = Callable[["torch.Tensor | None", "torch.Tensor | None"], float]


class CostObjective(ObjectiveBase):
    """Costs are minimised by default."""

    default_direction: ClassVar[Direction] = "minimize"

    def aligned(self, model: Any, measure: Measure) -> tuple[float, int]:
        """Σ ``measure`` over the model aligned with the base (see the module docstring), and the entry count.

        Args:
            model: the merged model.
            measure: ``measure(t, r)`` for a model tensor ``t`` and its base tensor ``r``; ``r`` is None for a
                tensor of an inserted layer (compare with zeros), ``t`` None for one of a dropped layer.

        Returns:
            ``(total, entries)``: the summed measure and the number of entries it covers.
        """
        model = static_part(model)
        base = self.require_base()  # may be lazy (read from disk per tensor): hold names, fetch when measuring
        base_layers: dict[int, dict[str, str]] = {}  # base depth -> {name pattern: base tensor name}
        for name in base:
            key, layer = layer_key(name)
            if layer is not None:
                base_layers.setdefault(layer, {})[key] = name
        out_layers: dict[int, dict[str, torch.Tensor]] = {}
        total, entries = 0.0, 0
        for name, tensor in model.state_dict().items():
            key, layer = layer_key(name)
            if layer is not None:
                out_layers.setdefault(layer, {})[key] = tensor
            elif name in base:
                ref = base[name]
                if ref.shape == tensor.shape:
                    total += measure(tensor, ref.to(tensor.device))
                    entries += tensor.numel()
        sources = source_layers(model, len(out_layers))
        count = {s: sources.count(s) for s in set(sources)}
        copies: dict[int, list[tuple[float, float]]] = {}  # base depth -> (paired, inserted) cost of each copy
        for i, s in zip(sorted(out_layers), sources, strict=True):
            names = base_layers.get(s, {})
            paired = inserted = 0.0
            for key, t in out_layers[i].items():
                if s not in base_layers:  # a depth the base does not have: an inserted layer
                    inserted += measure(t, None)
                    entries += t.numel()
                    continue
                r = base[names[key]] if key in names else None
                if r is None or r.shape != t.shape:
                    continue
                entries += t.numel()
                paired += measure(t, r.to(t.device))
                if count[s] > 1:  # only then can this copy be an inserted layer
                    inserted += measure(t, None)
            copies.setdefault(s, []).append((paired, inserted))
        for s, names in base_layers.items():
            found = copies.pop(s, [])
            if not found:  # dropped: the base layer zeroed
                for name in names.values():
                    r = base[name]
                    total += measure(None, r)
                    entries += r.numel()
                continue
            # pair the copy with the smallest (paired - inserted); the others count as inserted layers
            total += sum(ins for _, ins in found) + min(p - ins for p, ins in found)
        for found in copies.values():  # output layers standing for a depth the base does not have
            total += sum(ins for _, ins in found)
        return total, entries


def _l1(t: torch.Tensor | None, r: torch.Tensor | None) -> float:
    # float64 accumulation: millions of tiny differences would lose digits in float32.
    if t is None:
        return float(r.double().abs().sum())
    if r is None:
        return float(t.double().abs().sum())
    return float((t.double() - r.double()).abs().sum())


def _changed(t: torch.Tensor | None, r: torch.Tensor | None) -> float:
    if t is None:
        return float((r != 0).sum())
    if r is None:
        return float((t != 0).sum())
    return float((t != r.to(t.dtype)).sum())


class L1FromBase(CostObjective):
    """Σ|θ − θ0| over the model aligned with the base (MM-MO's sparsity metric; dropped layers count Σ|θ0|)."""

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> float:
        return self.aligned(model, _l1)[0]


class NonzeroDelta(CostObjective):
    """Fraction of aligned entries that differ from the base (a dropped layer's non-zero entries all differ)."""

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> float:
        changed, total = self.aligned(model, _changed)
        return changed / total if total else 0.0


class ParamCount(CostObjective):
    """Number of parameters (tied tensors counted once)."""

    def __call__(self, model: Any, tokenizer: Any) -> float:
        return float(sum(p.numel() for p in model.parameters()))


def _numel(model: Any) -> int:
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


class ExtraParams(CostObjective):
    """Numbers a candidate adds to its static merge (a twin's low-rank experts, a router, per-task corrections:
    parameters and buffers), as a fraction of the static model's parameters (0 for a static merge)."""

    def __call__(self, model: Any, tokenizer: Any) -> float:
        static = static_part(model)
        return float(_numel(model) - _numel(static)) / sum(p.numel() for p in static.parameters())


def decoder_layers(model: Any) -> int:
    """Length of the decoder's layer list (``model.layers``, ``transformer.h``, ...), else the config's count."""
    model = static_part(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return len(module)
    return int(model.config.num_hidden_layers)


class LayerCount(CostObjective):
    """Number of decoder layers (changes with layer-wise architecture choices)."""

    def __call__(self, model: Any, tokenizer: Any) -> float:
        return float(decoder_layers(model))


class LatencyParams(Params):
    batch: int = PydField(default=1, ge=1)
    #: tokens per sequence (capped at the model's max_position_embeddings).
    length: int = PydField(default=128, ge=1)
    warmup: int = PydField(default=2, ge=0)
    repeats: int = PydField(default=5, ge=1)


class Latency(CostObjective):
    """Median forward time in milliseconds on a fixed random batch, after warm-up."""

    Params = LatencyParams

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> float:
        p = self.params
        length = min(p.length, getattr(model.config, "max_position_embeddings", None) or p.length)
        vocab = model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(self.config.seed)
        ids = torch.randint(vocab, (p.batch, length), generator=gen).to(model_device(model))
        sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
        times = []
        for i in range(p.warmup + p.repeats):
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            sync()
            if i >= p.warmup:
                times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
