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

    def __call__(self, model: Any, tokenizer: Any) -> float:
        scores = score_continuations(
            model, self.encoded(tokenizer), pad_token=pad_id(tokenizer),
            padding_side=tokenizer.padding_side, batch_size=self.config.batch_size,
        )
        self.last_details = [
            {"line": ex["_line"], "logprob": s.logprob, "tokens": s.tokens}
            for ex, s in zip(self.examples, scores, strict=True)
        ]
        total = sum(s.logprob for s in scores)
        value = total / sum(s.tokens for s in scores) if self.params.per_token else total / len(scores)
        return -value if self.params.nll else value
