"""Multiple-choice accuracy on JSONL ``{"prompt"|"query", "choices": [...], "label": int}`` examples.

Each choice is scored by its log-likelihood after the prompt (lm-eval's ``acc``), optionally divided by its
length in characters (lm-eval's ``acc_norm``) or tokens; the highest-scoring choice (first on ties) is the
model's answer.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from mergesearch.errors import DataError
from mergesearch.objectives.data import Field
from mergesearch.objectives.scoring import pad_id, score_continuations
from mergesearch.objectives.task import PromptTask, TaskParams


class ChoiceParams(TaskParams):
    #: ``none`` = acc, ``chars`` = acc_norm (lm-eval), ``tokens`` = per-token mean.
    length_norm: Literal["none", "chars", "tokens"] = "none"
    #: put between prompt and each choice (lm-eval's target_delimiter).
    delimiter: str = " "


class Choice(PromptTask):
    """Fraction of examples whose labelled choice has the highest (normalised) log-likelihood."""

    Params = ChoiceParams
    fields: ClassVar[tuple[Field, ...]] = (("prompt", "query"), "choices", "label")
    prompt_keys: ClassVar[tuple[str, ...]] = ("prompt", "query")

    def check_examples(self) -> None:
        super().check_examples()
        for ex in self.examples:
            where = f"{self.path}:{ex['_line']}"
            choices, label = ex["choices"], ex["label"]
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                raise DataError(f"{where}: 'choices' must be a non-empty list of strings")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
                raise DataError(f"{where}: 'label' must be an int in [0, {len(choices)}), got {label!r}")

    def encode(self, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
        requests = []
        for ex in self.examples:
            prompt = self.prompt_ids(tokenizer, ex)
            for c in ex["choices"]:
                requests.append((prompt, self.answer_ids(tokenizer, ex, self.params.delimiter + c, False)))
        return requests

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        examples = self.examples[start:stop]
        first = sum(len(ex["choices"]) for ex in self.examples[:start])  # requests are one per choice
        count = sum(len(ex["choices"]) for ex in examples)
        scores = iter(score_continuations(
            model, self.encoded(tokenizer)[first:first + count], pad_token=pad_id(tokenizer),
            padding_side=tokenizer.padding_side, batch_size=self.config.batch_size,
        ))
        records = []
        for ex in examples:
            values = []
            for c in ex["choices"]:
                s = next(scores)
                norm = {"none": 1, "chars": len(c), "tokens": s.tokens}
                values.append(s.logprob / max(norm[self.params.length_norm], 1))
            pred = max(range(len(values)), key=lambda j: (values[j], -j))
            records.append({"line": ex["_line"], "pred": pred, "correct": pred == ex["label"], "scores": values,
                            "value": float(pred == ex["label"])})
        return records
