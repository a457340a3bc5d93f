"""Teacher-forced scoring of continuations: one batched forward pass gives log-likelihoods and greedy checks.

For a context ``c`` and continuation ``a1..ak``, one forward pass over ``c + a`` gives, at every continuation
position, the log-probability of the true token and whether it is the argmax. Their sum is the log-likelihood
of ``a`` given ``c``; "all argmax" means greedy decoding from ``c`` reproduces ``a`` exactly (METHODS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from mergesearch.errors import DataError


class Score(NamedTuple):
    """Result for one (context, continuation) pair."""

    logprob: float  # sum of log p(a_j | c, a_<j)
    tokens: int  # k, the continuation length
    greedy: bool  # every a_j is the argmax given its prefix


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt, with the tokenizer's special tokens (BOS), optionally through its chat template."""
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The template already writes the special tokens (BOS included).
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def encode_continuation(tokenizer: Any, text: str, eos: bool = False) -> list[int]:
    """Token ids of an answer (no special tokens), with EOS appended if asked.

    Encoding prompt and answer apart and concatenating the ids keeps the boundary fixed, whatever the tokenizer
    would merge across it.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if eos:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no EOS token; set eos: false")
        ids.append(tokenizer.eos_token_id)
    return ids


def pad_id(tokenizer: Any) -> int:
    """The id used for padding (masked out, so any valid id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def pad(
    seqs: Sequence[Sequence[int]], pad_token: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Pad sequences into a batch.

    Args:
        seqs: B token-id lists.
        pad_token: filler id (masked).
        side: ``right`` or ``left``.
        device: where the tensors go.

    Returns:
        ``input_ids`` [B, L], ``attention_mask`` [B, L], ``position_ids`` [B, L] (0 at each sequence's first
        real token, so left padding does not shift positions), and each sequence's start offset in its row.
    """
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_token, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        start = length - len(s) if side == "left" else 0
        ids[i, start : start + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, start : start + len(s)] = 1
        offsets.append(start)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device), offsets


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (little padding; out-of-memory shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def score_continuations(
    model: Any,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token: int,
    padding_side: str = "right",
    batch_size: int = 32,
) -> list[Score]:
    """Score (context, continuation) id pairs with one teacher-forced forward pass per batch.

    Args:
        model: a causal LM returning ``logits`` [B, L, V].
        requests: pairs of token-id lists; contexts must be non-empty (start with BOS), continuations too.
        pad_token: id used for padding.
        padding_side: ``right`` or ``left`` (the tokenizer's); scores do not depend on it.
        batch_size: sequences per forward pass.

    Returns:
        One :class:`Score` per request, in request order.
    """
    device = model_device(model)
    seqs = [list(c) + list(a) for c, a in requests]
    out: list[Score | None] = [None] * len(requests)
    for batch in batches_by_length([len(s) for s in seqs], batch_size):
        ids, mask, positions, offsets = pad([seqs[i] for i in batch], pad_token, padding_side, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        for row, i in enumerate(batch):
            ctx_len, k = len(requests[i][0]), len(requests[i][1])
            start = offsets[row] + ctx_len  # first continuation token in the row
            # logits at t predict token t+1: the k predictions are at start-1 .. start+k-2.
            pred = logits[row, start - 1 : start + k - 1].float()  # [k, V]
            target = ids[row, start : start + k]  # [k]
            logp = torch.log_softmax(pred, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((pred.argmax(-1) == target).all())
            out[i] = Score(float(logp.sum()), k, greedy)
    return out  # type: ignore[return-value]
