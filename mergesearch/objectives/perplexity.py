"""Perplexity on a text file (``.txt``) or JSONL ``text`` lines, with sliding windows for long texts.

Long texts are scored in windows of at most ``window`` tokens (the model's context). Each window predicts the
next ``stride`` tokens, with the ``window - stride`` tokens before them as context (Hugging Face's strided
perplexity recipe, written so that every token after the first is predicted exactly once): a small stride
gives each prediction more context, ``stride = window`` is fastest.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field as PydField
from pydantic import model_validator

from mergesearch.errors import DataError
from mergesearch.objectives.base import Direction, ObjectiveBase, ObjectiveContext, Params
from mergesearch.objectives.data import data_path, read_texts, subset
from mergesearch.objectives.scoring import pad_id, score_continuations

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class PerplexityParams(Params):
    #: tokens per window (default: the model's max_position_embeddings, at most 1024).
    window: int | None = PydField(default=None, ge=2)
    #: tokens predicted per window (default and maximum: window - 1); the rest of the window is context.
    stride: int | None = PydField(default=None, ge=1)

    @model_validator(mode="after")
    def _stride_fits(self) -> PerplexityParams:
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) > window ({self.window})")
        return self


def windows(ids: list[int], window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pairs predicting tokens 1..n-1 of ``ids`` exactly once (token 0, e.g. BOS, is given).

    Targets come in chunks of ``min(stride, window - 1)`` tokens (one token of a window is always context);
    each chunk's context is the ``window - len(chunk)`` tokens before it (fewer at the start).
    """
    step = min(stride, window - 1)
    out = []
    pos = 1
    while pos < len(ids):
        end = min(pos + step, len(ids))
        out.append((ids[max(0, end - window) : pos], ids[pos:end]))
        pos = end
    return out


class Perplexity(ObjectiveBase):
    """exp(mean negative log-likelihood per predicted token) over all texts."""

    Params = PerplexityParams
    default_direction: ClassVar[Direction] = "minimize"
    needs_data: ClassVar[bool] = True

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        self.path = data_path(config, context)
        texts = read_texts(self.path)
        self.texts = [texts[i] for i in subset(len(texts), config.limit, config.seed)]
        self._key: Any = None
        self._requests: list[list[tuple[list[int], list[int]]]] = []

    def size(self) -> int:
        return len(self.texts)

    def requests(self, model: Any, tokenizer: Any) -> list[list[tuple[list[int], list[int]]]]:
        """Window requests per text for this tokenizer and model (cached)."""
        max_pos = getattr(model.config, "max_position_embeddings", None) or 1024
        window = self.params.window or min(max_pos, 1024)
        stride = self.params.stride or window
        if self._key != (tokenizer, window, stride):
            self._requests = [windows(list(tokenizer(t)["input_ids"]), window, stride) for t in self.texts]
            if not any(self._requests):
                raise DataError(f"{self.path}: texts too short (need at least 2 tokens)")
            self._key = (tokenizer, window, stride)
        return self._requests

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        per_text = self.requests(model, tokenizer)[start:stop]
        scores = iter(score_continuations(
            model, [r for text in per_text for r in text], pad_token=pad_id(tokenizer),
            padding_side=tokenizer.padding_side, batch_size=self.config.batch_size,
        ))
        records = []
        for text in per_text:
            parts = [next(scores) for _ in text]
            records.append({"logprob": sum(s.logprob for s in parts), "tokens": sum(s.tokens for s in parts)})
        return records

    def reduce(self, records: list[dict[str, Any]]) -> float:
        tokens = sum(r["tokens"] for r in records)
        if tokens == 0:  # only texts of one token in this prefix: nothing predicted yet
            raise DataError(f"{self.path}: texts too short (need at least 2 tokens)")
        return math.exp(-sum(r["logprob"] for r in records) / tokens)
