"""Variance-collapse correction (Sharma, Roy & Dziugaite 2024): per task, an affine map of each decoder block's
output so that the merged model's activations have expert t's per-channel mean and standard deviation.

Merging experts that moved far from the base shrinks the variance of the merged model's activations ("variance
collapse"). For task t and each block output h (the residual stream after block l, [B, L, H]) the correction is

    h' = (h − μ_merged)·σ_t / σ_merged + μ_t = h·scale_t + shift_t,      per channel, statistics over the task's
                                                                        unlabelled prompts' real tokens

fitted block by block with the earlier blocks' corrections already on (REPAIR-style), so after correction every
block's output statistics match expert t's on those prompts. The corrections are a per-task family: a
:class:`~mergesearch.twin.routed.RoutedModel` applies them per example mixed by the router's α
(h' = h·Σ_t α_t scale_t + Σ_t α_t shift_t), or by a task id (oracle α).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergesearch.errors import DataError

#: a standard deviation below this (a dead channel) is not divided by
_MIN_STD = 1e-6


@dataclass(frozen=True)
class Corrections:
    """Per-task affine corrections of the decoder blocks' outputs.

    Attributes:
        layers: module names of the corrected blocks (e.g. ``model.layers.0``), in order (L of them).
        scale, shift: [T, L, H] float32: task t's block-l output becomes ``h·scale[t, l] + shift[t, l]``.
    """

    layers: tuple[str, ...]
    scale: torch.Tensor
    shift: torch.Tensor

    def num_params(self) -> int:
        return self.scale.numel() + self.shift.numel()


def decoder_layers(model: nn.Module) -> list[str]:
    """Module names of the model's decoder blocks (``model.layers.i``, ``transformer.h.i``, …), in order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return [f"{name}.{i}" for i in range(len(module))]
    raise DataError("variance correction: the model has no list of decoder layers")


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def with_block_output(out: Any, h: torch.Tensor) -> Any:
    return (h, *out[1:]) if isinstance(out, tuple) else h


@torch.no_grad()
def block_stats(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layers: Sequence[str], *,
                batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of each block's output over the prompts' real tokens.

    Args:
        model: a HF causal LM (or a routed model: its hooks act as usual).
        tokenizer: encodes the prompts (right padding; padded positions are left out).
        prompts: unlabelled prompts of one task.
        layers: block module names.

    Returns:
        (mean, std), each [L, H] float32 (float64 sums).

    Raises:
        DataError: no prompts.
    """
    from mergesearch.objectives.scoring import model_device

    if not prompts:
        raise DataError("variance correction: a task has no prompts to compute statistics on")
    sums: list[torch.Tensor | None] = [None] * len(layers)
    sq: list[torch.Tensor | None] = [None] * len(layers)
    count = 0
    mask_now: list[torch.Tensor] = []

    def hook(i: int):
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            h = block_output(out).double()[mask_now[0]]  # [tokens, H]
            s, q = h.sum(0), (h * h).sum(0)
            sums[i] = s if sums[i] is None else sums[i] + s
            sq[i] = q if sq[i] is None else sq[i] + q
        return fn

    root = getattr(model, "shared", model)
    handles = [root.get_submodule(name).register_forward_hook(hook(i)) for i, name in enumerate(layers)]
    device = model_device(root)
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
            ids, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            mask_now[:] = [att.bool()]
            count += int(att.sum())
            model(input_ids=ids, attention_mask=att)
    finally:
        for h in handles:
            h.remove()
    mean = torch.stack([s / count for s in sums])  # type: ignore[operator]
    var = torch.stack([q / count for q in sq]) - mean * mean  # type: ignore[operator]
    return mean.float(), var.clamp(min=0).sqrt().float()


def fit_layer(merged: tuple[torch.Tensor, torch.Tensor], expert: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [H] taking statistics (μ_m, σ_m) to (μ_e, σ_e): scale = σ_e/σ_m, shift = μ_e − μ_m·scale.

    A dead merged channel (σ_m below 1e-6) is shifted, not scaled.
    """
    (mu_m, sd_m), (mu_e, sd_e) = merged, expert
    scale = torch.where(sd_m > _MIN_STD, sd_e / sd_m.clamp(min=_MIN_STD), torch.ones_like(sd_m))
    return scale, mu_e - mu_m * scale


class AffineMix(nn.Module):
    """Task-specific affine corrections of one block, applied per example: h·(α·scale) + α·shift."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)  # [T, H]
        self.register_buffer("shift", shift)

    def forward(self, h: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if h.shape[0] != alpha.shape[0]:  # generate's expansion repeats each row
            alpha = alpha.repeat_interleave(h.shape[0] // alpha.shape[0], dim=0)
        a = alpha.to(self.scale.dtype)
        s, b = (a @ self.scale)[:, None, :], (a @ self.shift)[:, None, :]  # [B, 1, H]
        return (h.to(s.dtype) * s + b).to(h.dtype)


def fit_corrections(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[str]],
                    expert_stats: Sequence[tuple[torch.Tensor, torch.Tensor]], layers: Sequence[str]
                    ) -> Corrections:
    """Fit every task's corrections on the merged ``model``, block by block with earlier blocks corrected.

    Args:
        model: the merged (shared) HF causal LM; left unchanged (hooks are removed).
        tokenizer: its tokenizer.
        prompts: ``prompts[t]``: task t's unlabelled prompts.
        expert_stats: ``(mean, std)`` [L, H] of expert t's block outputs on ``prompts[t]`` (:func:`block_stats`).
        layers: block module names.

    Returns:
        The corrections ([T, L, H] scale and shift).
    """
    t_count, n_layers = len(prompts), len(layers)
    hidden = expert_stats[0][0].shape[1]
    scale = torch.ones(t_count, n_layers, hidden)
    shift = torch.zeros(t_count, n_layers, hidden)
    for t in range(t_count):
        for li in range(n_layers):
            # blocks before li corrected for task t, then this block's statistics
            handles = [_hook_fixed(model, layers[j], scale[t, j], shift[t, j]) for j in range(li)]
            try:
                mean, std = block_stats(model, tokenizer, prompts[t], [layers[li]])
            finally:
                for h in handles:
                    h.remove()
            s, b = fit_layer((mean[0], std[0]), (expert_stats[t][0][li], expert_stats[t][1][li]))
            scale[t, li], shift[t, li] = s, b
    return Corrections(tuple(layers), scale, shift)


def _hook_fixed(model: nn.Module, layer: str, scale: torch.Tensor, shift: torch.Tensor) -> Any:
    def fn(module: nn.Module, args: Any, out: Any) -> Any:
        h = block_output(out)
        return with_block_output(out, (h.float() * scale.to(h.device) + shift.to(h.device)).to(h.dtype))
    return model.get_submodule(layer).register_forward_hook(fn)
