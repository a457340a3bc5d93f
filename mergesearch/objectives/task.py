"""Shared base of the prompt/answer task objectives: data read once, token ids cached per tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from mergesearch.errors import DataError
from mergesearch.objectives.base import ObjectiveBase, ObjectiveContext, Params
from mergesearch.objectives.data import Field, data_path, field_str, load_examples
from mergesearch.objectives.scoring import encode_continuation, encode_prompt

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class TaskParams(Params):
    """Options shared by the JSONL task objectives."""

    #: format the prompt with ``tokenizer.apply_chat_template`` (as one user turn, with a generation prompt).
    chat_template: bool = False


class PromptTask(ObjectiveBase):
    """An objective over JSONL examples with a prompt; subclasses turn examples into scoring requests."""

    needs_data: ClassVar[bool] = True
    fields: ClassVar[Sequence[Field]] = ("prompt",)
    prompt_keys: ClassVar[Sequence[str]] = ("prompt",)

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        self.path = data_path(config, context)
        self.examples = load_examples(config, context, self.fields)
        self.check_examples()
        self._tokenizer: Any = None
        self._encoded: Any = None

    def size(self) -> int:
        return len(self.examples)

    def check_examples(self) -> None:
        """Validate field types at build time (so a bad line fails before the search starts)."""
        for ex in self.examples:
            field_str(ex, self.prompt_keys, self.path)

    def prompt_ids(self, tokenizer: Any, ex: dict[str, Any]) -> list[int]:
        """The prompt's token ids (with BOS, through the chat template if asked)."""
        return encode_prompt(tokenizer, field_str(ex, self.prompt_keys, self.path), self.params.chat_template)

    def answer_ids(self, tokenizer: Any, ex: dict[str, Any], text: str, eos: bool) -> list[int]:
        """A continuation's token ids; an empty one is a DataError naming the line."""
        ids = encode_continuation(tokenizer, text, eos)
        if not ids:
            raise DataError(f"{self.path}:{ex['_line']}: empty answer (set eos: true or give an answer)")
        return ids

    def encode(self, tokenizer: Any) -> Any:
        """Build this objective's requests for ``tokenizer``; computed once per tokenizer."""
        raise NotImplementedError

    def encoded(self, tokenizer: Any) -> Any:
        """Cached :meth:`encode` (workers keep one tokenizer, so this runs once per worker)."""
        if self._tokenizer is not tokenizer:
            self._encoded = self.encode(tokenizer)
            self._tokenizer = tokenizer
        return self._encoded


class PromptAnswerTask(PromptTask):
    """A task on ``{"prompt", "answer"}`` examples, each scored as answer (+ EOS if ``params.eos``) after prompt."""

    fields: ClassVar[Sequence[Field]] = ("prompt", "answer")

    def check_examples(self) -> None:
        super().check_examples()
        for ex in self.examples:
            field_str(ex, ("answer",), self.path)

    def encode(self, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
        return [
            (self.prompt_ids(tokenizer, ex), self.answer_ids(tokenizer, ex, ex["answer"], self.params.eos))
            for ex in self.examples
        ]
