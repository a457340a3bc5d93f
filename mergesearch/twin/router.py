"""Twin-Merging's router: a small MLP from the shared model's pooled prompt representation to expert weights α.

The representation is the mean, over the prompt's first ``window`` real tokens, of the shared model's last hidden
state (after the final norm). Pooling a fixed leading window rather than "the whole prompt" is what lets a routed
model serve the objectives unchanged: a teacher-forced pass over prompt+answer does not say where the prompt
ends, but as long as ``window`` ≤ the prompt's length, the first ``window`` tokens are prompt tokens in the
teacher-forced pass, in generation and in training alike, so α depends on the prompt only and greedy decoding
still equals the teacher-forced argmax check. By default ``window`` is the shortest training prompt's length.
Callers that know the prompt lengths can pass them (``prompt_lengths``); the window is then cut at the prompt's end.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mergesearch.errors import ConfigError, DataError


@dataclass(frozen=True)
class RouterSettings:
    """How a router is built and trained.

    Attributes:
        width: hidden units of the MLP.
        steps: full-batch AdamW steps (the features are computed once; a step costs microseconds on the demo).
        lr, weight_decay: AdamW's.
        window: leading prompt tokens pooled; ``"shortest"``: the shortest training prompt's length; ``None``:
            whole prompts (then a teacher-forced caller must pass ``prompt_lengths`` or answers leak into α).
        chat_template: encode prompts through the tokenizer's chat template, as objectives with that option do.
        batch_size: prompts per forward pass when computing features.
    """

    width: int = 64
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-4
    window: int | Literal["shortest"] | None = "shortest"
    chat_template: bool = False
    batch_size: int = 32


class Router(nn.Module):
    """MLP over standardised pooled hidden states: logits [B, T], softmax α [B, T].

    Args:
        hidden_size: H, the shared model's hidden size.
        num_experts: T.
        width: hidden units.
        window: leading real tokens pooled (``None``: the whole prompt); stored with the router.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, width: int = 64, window: int | None = None):
        super().__init__()
        self.hidden_size, self.num_experts, self.width, self.window = hidden_size, num_experts, width, window
        # Feature standardisation (fit on the training features): hidden states of different models differ in
        # scale by orders of magnitude, so a fixed learning rate only works on standardised inputs.
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, num_experts))
        self.train_accuracy: float | None = None
        self.train_seconds: float | None = None

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, T] of pooled features [B, H] (any float dtype; computed in float32)."""
        x = (pooled.to(self.mean.device, torch.float32) - self.mean) / self.scale
        return self.net(x)

    def weights(self, pooled: torch.Tensor) -> torch.Tensor:
        """α [B, T]: softmax of the logits, float32."""
        return torch.softmax(self(pooled), dim=-1)

    def config_dict(self) -> dict[str, Any]:
        """What ``router.json`` holds: enough to rebuild the module before loading its weights."""
        return {"hidden_size": self.hidden_size, "num_experts": self.num_experts, "width": self.width,
                "window": self.window, "train_accuracy": self.train_accuracy}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Router:
        """An untrained router of the shape ``cfg`` (from :meth:`config_dict`) describes."""
        router = cls(int(cfg["hidden_size"]), int(cfg["num_experts"]), width=int(cfg["width"]),
                     window=None if cfg.get("window") is None else int(cfg["window"]))
        router.train_accuracy = cfg.get("train_accuracy")
        return router


def routing_mask(attention_mask: torch.Tensor, window: int | None = None,
                 prompt_lengths: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Which tokens are pooled: each row's first min(window, prompt length) real tokens.

    Args:
        attention_mask: [B, L], 1 on real tokens (left or right padding).
        window: leading real tokens (``None``: no limit).
        prompt_lengths: [B] prompt length of each row (``None``: the whole row is prompt).

    Returns:
        [B, L] bool.
    """
    real = attention_mask.bool()
    rank = real.long().cumsum(-1)  # 1-based index of each real token within its row
    limit = torch.full((real.shape[0],), torch.iinfo(torch.long).max, dtype=torch.long, device=real.device)
    if prompt_lengths is not None:
        limit = torch.as_tensor(prompt_lengths, dtype=torch.long, device=real.device).clone()
    if window is not None:
        limit = limit.clamp(max=window)
    return real & (rank <= limit[:, None])


def pooled_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the model's last hidden state over the ``mask``ed tokens of each row.

    Runs the model's decoder (``base_model``: no LM head) only up to the last pooled column: a causal model's
    hidden states there do not depend on later tokens, so the answer part of a teacher-forced batch is skipped.

    Args:
        model: a HF causal LM (the shared model, its adapters off).
        input_ids, attention_mask: [B, L].
        mask: [B, L] bool, tokens to pool (at least one per row).
        position_ids: [B, L] or ``None`` (then 0 at each row's first real token, as the objectives and
            ``generate`` number them).

    Returns:
        [B, H] float32.
    """
    if not bool(mask.any(-1).all()):
        raise DataError("every routed sequence needs at least one prompt token to pool")
    end = int(mask.long().cumsum(-1).argmax(-1).max()) + 1  # one past the last pooled column of any row
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end],
                              position_ids=position_ids[:, :end], use_cache=False).last_hidden_state
    m = mask[:, :end, None].to(torch.float32)
    return (hidden.float() * m).sum(1) / m.sum(1)


def _features(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], window: int | None,
              batch_size: int) -> torch.Tensor:
    from mergesearch.objectives.scoring import model_device, pad, pad_id

    device = model_device(model)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, mask, pos, _ = pad(prompts[i : i + batch_size], pad_id(tokenizer), "right", device)
        out.append(pooled_hidden(model, ids, mask, routing_mask(mask, window), pos))
    return torch.cat(out)


def encode_prompts(tokenizer: Any, prompts: Sequence[Sequence[str]], chat_template: bool = False
                   ) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids of every expert's prompts, as the objectives encode them, and the expert label of each [N]."""
    from mergesearch.objectives.scoring import encode_prompt

    ids, labels = [], []
    for t, group in enumerate(prompts):
        if not group:
            raise DataError(f"twin router: no training prompts for expert {t}")
        for p in group:
            ids.append(encode_prompt(tokenizer, p, chat_template))
            labels.append(t)
    return ids, torch.tensor(labels)


def train_router(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[str]],
                 settings: RouterSettings | None = None, *, seed: int = 0) -> Router:
    """Train a router on task-labelled prompts: ``prompts[t]`` are prompts of expert t's task.

    Features are computed once on ``model`` (the shared model, adapters off); the MLP is trained full-batch on
    the CPU or the model's device, seeded (same seed, same router).

    Args:
        model: the shared HF causal LM.
        tokenizer: its tokenizer.
        prompts: one list of prompt strings per expert (e.g. the search split of each task objective).
        settings: sizes and schedule (default :class:`RouterSettings`).
        seed: seeds the MLP's initialisation.

    Returns:
        The trained router (eval mode), on the model's device, with ``train_accuracy`` and ``train_seconds``.

    Raises:
        DataError: an expert without prompts. ConfigError: fewer than two experts, or a bad window.
    """
    settings = settings or RouterSettings()
    if len(prompts) < 2:
        raise ConfigError(f"twin router needs prompts of at least two experts, got {len(prompts)}")
    start = time.perf_counter()
    ids, labels = encode_prompts(tokenizer, prompts, settings.chat_template)
    window = min(len(p) for p in ids) if settings.window == "shortest" else settings.window
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"twin router window must be a positive number of tokens, 'shortest' or null, "
                          f"got {settings.window!r}")
    with torch.no_grad():
        feats = _features(model, tokenizer, ids, window, settings.batch_size)  # [N, H]
    labels = labels.to(feats.device)
    with torch.random.fork_rng(devices=[feats.device] if feats.device.type == "cuda" else []):
        torch.manual_seed(seed)
        router = Router(feats.shape[1], len(prompts), width=settings.width, window=window).to(feats.device)
    router.mean.copy_(feats.mean(0))
    router.scale.copy_(feats.std(0, unbiased=False).clamp(min=1e-6))
    opt = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    router.train()
    with torch.enable_grad():
        for _ in range(settings.steps):
            loss = nn.functional.cross_entropy(router(feats), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    router.eval().requires_grad_(False)
    with torch.no_grad():
        router.train_accuracy = float((router(feats).argmax(-1) == labels).float().mean())
    router.train_seconds = time.perf_counter() - start
    return router

