"""Fit the exclusive factors to the experts' outputs: knowledge distillation from the SVD start.

The paper's exclusive part is the rank-r SVD truncation of θt − θ*, the best rank-r fit in Frobenius norm. Task
vectors of fully fine-tuned experts are far from low rank (on the demo, rank 4 keeps about 60 % of ‖θt − θ*‖²),
so at the small ranks a parameter budget allows, the truncation loses much of what the expert does. What matters
is the function: the routed model with expert t's adapter should predict what expert t predicts on task t. So,
starting from the SVD factors, Adam fits all experts' factors at once (each row of a batch carries its own
expert's adapter through the one-hot α the routed model already supports) to minimise

    KL(expert t ‖ θ* + B_t·A_t)   on task t's fit prompts followed by expert t's greedy continuation,

at the positions that predict the continuation (the last prompt token and every continuation token but the last),
over the expert's ``top_k`` most likely tokens there plus one outcome for all the others (the exact KL when the
vocabulary is no larger), so the cached targets stay small for real vocabularies. The fit prompts are
``space.twin.fit_data``'s when the job gives them (disjoint from the prompts trials are scored on,
:mod:`mergesearch.twin.data`), else the search prompts. This is sequence-level
knowledge distillation (Kim and Rush, 2016) into LoRA-shaped factors; the teacher's targets do not depend on θ*,
so a search computes them once per expert (:func:`expert_teacher`) and every trial only runs the ``steps``
updates. Both distributions are softened by a temperature (4 by default) while fitting, as knowledge distillation
does. The factors keep their
shapes, so counting, export as PEFT adapters and loading are unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mergesearch.errors import ConfigError, DataError
from mergesearch.twin.factors import TwinFactors


@dataclass(frozen=True)
class DistillSettings:
    """How the factors are fitted (see the module docstring; mirrors the job's ``space.twin.distill``).

    Attributes:
        steps: Adam updates.
        lr: Adam's learning rate.
        batch: sequences per update, drawn from all experts' sequences together.
        max_new_tokens: length cap of each teacher continuation.
        top_k: teacher tokens kept per position.
        temperature: both distributions are softened to p^(1/T) (renormalised) before the KL, which is scaled by
            T² (Hinton et al., 2015): the expert's near-certain predictions then also teach which other tokens it
            finds plausible. T = 4 halved the held-out KL of T = 1 at the same cost on the demo (search prompts
            split 96/32 per task, two folds; the reports' KL is always at T = 1).
    """

    steps: int = 100
    lr: float = 1e-2
    batch: int = 96
    max_new_tokens: int = 16
    top_k: int = 64
    temperature: float = 4.0


@dataclass(frozen=True)
class Teacher:
    """One expert's distillation targets on its task's prompts (N sequences of at most L tokens).

    Attributes:
        input_ids: [N, L] prompt + greedy continuation, right-padded.
        attention_mask: [N, L] 1 on real tokens.
        position_ids: [N, L].
        loss_mask: [N, L] bool, the positions whose next-token distribution is matched.
        top_ids: [N, L, k] the teacher's k most likely next tokens (0 where ``loss_mask`` is off).
        top_logp: [N, L, k] their log-probabilities, float32.
        rest_logp: [N, L] log-probability of all the other tokens together (a log-sum-exp, not 1 − Σ top: the
            difference would be rounding noise for a confident teacher, and the temperature magnifies it).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor


@dataclass(frozen=True)
class DistillReport:
    """What a fit did: mean KL on all the sequences before and after, and its wall time in seconds."""

    kl_start: float
    kl_end: float
    seconds: float


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {int(i) for i in ids if i is not None}


@torch.no_grad()
def expert_teacher(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                   settings: DistillSettings | None = None, *, batch_size: int = 32) -> Teacher:
    """Expert ``model``'s targets on its task's encoded prompts: greedy continuations, then top-k next-token
    log-probabilities along prompt + continuation.

    Args:
        model: the expert (a HF causal LM; e.g. the resident model holding θ0 + τt).
        tokenizer: its tokenizer (padding and EOS ids).
        prompts: token ids of the task's prompts, as the objectives encode them.
        settings: ``max_new_tokens`` and ``top_k``.
        batch_size: prompts per generate / forward call.

    Returns:
        The teacher's targets, on the model's device.

    Raises:
        DataError: no prompts.
    """
    from mergesearch.objectives.scoring import model_device, pad, pad_id

    settings = settings or DistillSettings()
    if not prompts:
        raise DataError("twin distillation: no prompts to distil on")
    device = model_device(model)
    filler, eos = pad_id(tokenizer), _eos_ids(model, tokenizer)
    seqs: list[list[int]] = []
    starts: list[int] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[i : i + batch_size]]
        # left padding: every row's next token is at the same column while decoding
        ids, mask, _, _ = pad(chunk, filler, "left", device)
        new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                             do_sample=False, pad_token_id=filler, eos_token_id=sorted(eos) or None)
        for p, row in zip(chunk, new[:, ids.shape[1] :].tolist(), strict=True):
            if not p:
                raise DataError("twin distillation: an empty prompt (nothing to condition the continuation on)")
            cut = next((j + 1 for j, tok in enumerate(row) if tok in eos), len(row))  # keep the EOS: it is predicted
            seqs.append(p + row[:cut])
            starts.append(len(p))
    input_ids, attention_mask, position_ids, _ = pad(seqs, filler, "right", device)
    n, length = input_ids.shape
    loss_mask = torch.zeros(n, length, dtype=torch.bool, device=device)
    for j, (s, p) in enumerate(zip(seqs, starts, strict=True)):
        loss_mask[j, p - 1 : len(s) - 1] = True  # logits at p-1 .. end-2 predict the continuation's tokens
    ids_parts, logp_parts, rest_parts = [], [], []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        logits = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], position_ids=position_ids[sl],
                       use_cache=False).logits  # [b, L, V]
        logp = torch.log_softmax(logits.float(), -1)
        values, indices = logp.topk(min(settings.top_k, logits.shape[-1]), dim=-1)
        keep = loss_mask[sl, :, None]
        ids_parts.append(indices * keep)
        logp_parts.append(values * keep)
        rest_parts.append(torch.where(keep[..., 0], _rest(logp, indices), 0.0))  # not -inf * 0 = nan
    return Teacher(input_ids, attention_mask, position_ids, loss_mask, torch.cat(ids_parts), torch.cat(logp_parts),
                   torch.cat(rest_parts))


def _rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log Σ exp(logp) over the tokens not in ``ids`` ([..., V], [..., k] -> [...]; -inf when k = V)."""
    return logp.scatter(-1, ids, float("-inf")).logsumexp(-1)


def _stack(teachers: Sequence[Teacher]) -> tuple[Teacher, torch.Tensor]:
    """All teachers' rows in one right-padded batch, and each row's expert index [N]."""
    length = max(t.input_ids.shape[1] for t in teachers)

    def grow(x: torch.Tensor, fill: int | float | bool) -> torch.Tensor:
        if x.shape[1] == length:
            return x
        pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), fill)
        return torch.cat([x, pad], 1)

    fields = [torch.cat([grow(getattr(t, f), 0) for t in teachers]) for f in
              ("input_ids", "attention_mask", "position_ids", "loss_mask", "top_ids", "top_logp", "rest_logp")]
    labels = torch.cat([torch.full((t.input_ids.shape[0],), e, dtype=torch.long) for e, t in enumerate(teachers)])
    return Teacher(*fields), labels.to(fields[0].device)


def _kl(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, rest_logp: torch.Tensor,
        mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over the masked positions of T²·KL(p_T ‖ q_T) over k + 1 outcomes, the teacher's top-k tokens and "any
    other token" (just the k tokens when k is the vocabulary: then the exact KL), each distribution softened as
    p_T ∝ p^(1/T); zero whenever the two distributions agree.

    Args:
        logits: [B, L, V] the student's. top_ids, top_logp: [B, L, k], rest_logp: [B, L] the teacher's.
        mask: [B, L] bool.
        temperature: T.
    """
    logq_all = torch.log_softmax(logits[mask].float(), -1)  # [P, V]
    ids = top_ids[mask]
    logp, logq = top_logp[mask], logq_all.gather(-1, ids)  # [P, k]
    if ids.shape[-1] < logq_all.shape[-1]:
        logp = torch.cat([logp, rest_logp[mask][:, None]], -1)
        logq = torch.cat([logq, _rest(logq_all, ids)[:, None]], -1)
    logp_t = torch.log_softmax(logp / temperature, -1)
    logq_t = torch.log_softmax(logq / temperature, -1)
    return temperature**2 * (logp_t.exp() * (logp_t - logq_t)).sum(-1).mean()


def distill_factors(shared: nn.Module, factors: TwinFactors, teachers: Sequence[Teacher],
                    settings: DistillSettings | None = None, *, seed: int = 0) -> tuple[TwinFactors, DistillReport]:
    """Fit every expert's factors to its teacher, starting from ``factors`` (see the module docstring).

    The shared model is left as it was (its weights are not trained; their ``requires_grad`` flags are restored).

    Args:
        shared: the shared HF causal LM θ* (e.g. the merger's resident model after ``apply(plan)``).
        factors: the starting factors (the SVD's), experts in router order; rank ≥ 1.
        teachers: ``teachers[t]``: expert t's targets (:func:`expert_teacher`), on the shared model's device.
        settings: schedule (default :class:`DistillSettings`).
        seed: seeds the batch draws.

    Returns:
        New factors (float32, same modules and rank; ``factors`` is not modified) and a :class:`DistillReport`.

    Raises:
        ConfigError: rank 0, or not one teacher per expert.
    """
    from mergesearch.twin.routed import RoutedModel

    settings = settings or DistillSettings()
    if factors.rank < 1:
        raise ConfigError("twin distillation needs rank >= 1 (rank 0 has no factors to fit)")
    if len(teachers) != len(factors.experts):
        raise ConfigError(f"twin distillation: {len(teachers)} teachers for {len(factors.experts)} experts")
    start = time.perf_counter()
    data, labels = _stack(teachers)
    alpha = nn.functional.one_hot(labels, len(factors.experts)).float()
    flags = [(p, p.requires_grad) for p in shared.parameters()]
    routed = RoutedModel(shared, factors)
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        params = []
        for mixer in routed.mixers:
            # fresh leaves: LowRankMix's buffers may share storage with ``factors``, which must stay as given
            mixer.a = mixer.a.detach().clone().requires_grad_(True)
            mixer.b = mixer.b.detach().clone().requires_grad_(True)
            params += [mixer.a, mixer.b]

        def loss_of(rows: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
            out = routed(data.input_ids[rows], data.attention_mask[rows], data.position_ids[rows],
                         alpha=alpha[rows])
            return _kl(out.logits, data.top_ids[rows], data.top_logp[rows], data.rest_logp[rows],
                       data.loss_mask[rows], temperature)

        def mean_kl() -> float:
            # in batches, weighted by loss positions: one pass over everything may not fit in memory
            total, count = 0.0, 0
            for i in range(0, labels.shape[0], settings.batch):
                rows = torch.arange(i, min(i + settings.batch, labels.shape[0]), device=labels.device)
                n = int(data.loss_mask[rows].sum())
                if n:
                    total, count = total + float(loss_of(rows)) * n, count + n
            return total / max(count, 1)

        with torch.no_grad():
            kl_start = mean_kl()
        opt = torch.optim.Adam(params, lr=settings.lr)
        gen = torch.Generator().manual_seed(seed)
        with torch.enable_grad():
            for _ in range(settings.steps):
                rows = torch.randperm(labels.shape[0], generator=gen)[: settings.batch].to(labels.device)
                loss = loss_of(rows, settings.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            kl_end = mean_kl()
        t, r = len(factors.experts), factors.rank
        A = {m: mixer.a.detach().float().reshape(t, r, -1).contiguous()
             for m, mixer in zip(routed.targets, routed.mixers, strict=True)}
        B = {m: mixer.b.detach().float().reshape(mixer.b.shape[0], t, r).permute(1, 0, 2).contiguous()
             for m, mixer in zip(routed.targets, routed.mixers, strict=True)}
    finally:
        routed.detach()
        for p, flag in flags:
            p.requires_grad_(flag)
    fitted = TwinFactors(factors.experts, factors.names, factors.rank, A, B)
    return fitted, DistillReport(kl_start, kl_end, time.perf_counter() - start)
