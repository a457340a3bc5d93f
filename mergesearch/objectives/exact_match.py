"""Greedy exact-match accuracy on JSONL ``{"prompt", "answer"}`` examples.

``mode: forced`` (default) needs one teacher-forced forward pass over prompt+answer+EOS per batch: greedy
decoding reproduces the answer iff every answer token is the argmax given its prefix. ``mode: generate``
decodes greedily with ``model.generate`` and compares the stripped text (cut at EOS or a stop string), for
answers that must be parsed out of free text.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field as PydField

from mergesearch.objectives.scoring import (
    batches_by_length,
    model_device,
    pad,
    pad_id,
    score_continuations,
)
from mergesearch.objectives.task import PromptAnswerTask, TaskParams


class ExactMatchParams(TaskParams):
    mode: Literal["forced", "generate"] = "forced"
    #: the answer must be followed by EOS (greedy decoding stops exactly there).
    eos: bool = True
    #: generate mode: new tokens per example (default: the longest answer plus EOS).
    max_new_tokens: int | None = PydField(default=None, ge=1)
    #: generate mode: the output is cut at the first of these strings.
    stop: tuple[str, ...] = ()


class ExactMatch(PromptAnswerTask):
    """Fraction of examples whose greedy continuation is exactly the answer."""

    Params = ExactMatchParams

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        examples = self.examples[start:stop]
        if self.params.mode == "generate":
            outputs = self.generate(model, tokenizer, start, stop)
            correct = [out == ex["answer"].strip() for out, ex in zip(outputs, examples, strict=True)]
            return [{"line": ex["_line"], "correct": c, "output": o, "value": float(c)}
                    for ex, c, o in zip(examples, correct, outputs, strict=True)]
        scores = score_continuations(
            model, self.encoded(tokenizer)[start:stop], pad_token=pad_id(tokenizer),
            padding_side=tokenizer.padding_side, batch_size=self.config.batch_size,
        )
        return [{"line": ex["_line"], "correct": s.greedy, "value": float(s.greedy)}
                for ex, s in zip(examples, scores, strict=True)]

    @torch.inference_mode()
    def generate(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[str]:
        """Greedy outputs (decoded, cut at EOS and stop strings, stripped), one per example of ``[start, stop)``."""
        requests = self.encoded(tokenizer)[start:stop]
        prompts = [p for p, _ in requests]
        max_new = self.params.max_new_tokens or max(len(a) for _, a in requests) + 1
        eos, filler = tokenizer.eos_token_id, pad_id(tokenizer)
        outputs: list[str] = [""] * len(prompts)
        for batch in batches_by_length([len(p) for p in prompts], self.config.batch_size):
            # Batched decoding needs left padding: every row's next token is then at the same column.
            ids, mask, _, _ = pad([prompts[i] for i in batch], filler, "left", model_device(model))
            new = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                eos_token_id=eos, pad_token_id=filler,
            )[:, ids.shape[1] :]
            for row, i in enumerate(batch):
                tokens = new[row].tolist()
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos)]
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                for s in self.params.stop:
                    text = text.split(s, 1)[0]
                outputs[i] = text.strip()
        return outputs
