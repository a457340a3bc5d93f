"""Log-likelihood of the answer given the prompt on JSONL ``{"prompt", "answer"}`` examples."""

from __future__ import annotations

from typing import Any

from mergesearch.objectives.base import Direction
from mergesearch.objectives.scoring import pad_id, score_continuations
from mergesearch.objectives.task import PromptAnswerTask, TaskParams


class LogLikParams(TaskParams):
    #: average over answer tokens (token-weighted) instead of over examples (sum per answer).
    per_token: bool = False
    #: report the negative log-likelihood (then minimised by default).
    nll: bool = False
    #: include EOS after the answer.
    eos: bool = False


class LogLik(PromptAnswerTask):
    """Mean log-likelihood (or NLL) of answers, per example or per token."""

    Params = LogLikParams

    @classmethod
    def direction_for(cls, params: Any) -> Direction:
        return "minimize" if params.nll else "maximize"

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        scores = score_continuations(
            model, self.encoded(tokenizer)[start:stop], pad_token=pad_id(tokenizer),
            padding_side=tokenizer.padding_side, batch_size=self.config.batch_size,
        )
        return [{"line": ex["_line"], "logprob": s.logprob, "tokens": s.tokens}
                for ex, s in zip(self.examples[start:stop], scores, strict=True)]

    def reduce(self, records: list[dict[str, Any]]) -> float:
        total = sum(r["logprob"] for r in records)
        value = total / sum(r["tokens"] for r in records) if self.params.per_token else total / len(records)
        return -value if self.params.nll else value
