"""Cost objectives: distance from the base (sparsity of the merge), size, depth and speed of the merged model.

``l1_from_base`` and ``nonzero_delta`` compare each tensor of the model's state dict with the base tensor of
the same name and shape (others, e.g. tensors of layers that were dropped or reshaped, are skipped).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from pydantic import Field as PydField

from mergesearch.objectives.base import Direction, ObjectiveBase, Params
from mergesearch.objectives.scoring import model_device


class CostObjective(ObjectiveBase):
    """Costs are minimised by default."""

    default_direction: ClassVar[Direction] = "minimize"

    def deltas(self, model: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(model tensor, base tensor) for every name present in both with equal shapes."""
        base = self.require_base()
        for name, tensor in model.state_dict().items():
            if name in base:
                ref = base[name]
                if ref.shape == tensor.shape:
                    yield tensor, ref.to(tensor.device)


class L1FromBase(CostObjective):
    """Σ|θ − θ0| over all compared entries (MM-MO's sparsity metric)."""

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> float:
        # float64 accumulation: millions of tiny differences would lose digits in float32.
        return float(sum((t.double() - r.double()).abs().sum().item() for t, r in self.deltas(model)))


class NonzeroDelta(CostObjective):
    """Fraction of compared entries that differ from the base."""

    @torch.inference_mode()
    def __call__(self, model: Any, tokenizer: Any) -> float:
        changed = total = 0
        for t, r in self.deltas(model):
            changed += int((t != r.to(t.dtype)).sum())
            total += t.numel()
        return changed / total if total else 0.0


class ParamCount(CostObjective):
    """Number of parameters (tied tensors counted once)."""

    def __call__(self, model: Any, tokenizer: Any) -> float:
        return float(sum(p.numel() for p in model.parameters()))


def decoder_layers(model: Any) -> int:
    """Length of the decoder's layer list (``model.layers``, ``transformer.h``, ...), else the config's count."""
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
