"""`chat_template: true` scores the prompt as the tokenizer's chat template renders it."""

from __future__ import annotations

import copy

import pytest

from mergesearch.objectives import ObjectiveContext, build_objectives
from tests.objectives.conftest import objective, write_jsonl

# One user turn rendered as "<bos> <swap> PROMPT", plus " =" as the generation prompt.
TEMPLATE = ("{% for m in messages %}<bos> <swap> {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} ={% endif %}")


def test_chat_template_equals_hand_formatted_prompt(lm, tmp_path) -> None:
    model, tok, _ = lm
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = TEMPLATE
    raw = write_jsonl(tmp_path / "raw.jsonl",
                      [{"prompt": "1 2 3", "answer": "3 2 1"}, {"prompt": "4 5", "answer": "5"}])
    formatted = write_jsonl(tmp_path / "fmt.jsonl", [{"prompt": "<swap> 1 2 3 =", "answer": "3 2 1"},
                                                     {"prompt": "<swap> 4 5 =", "answer": "5"}])
    ctx = ObjectiveContext()
    (templated,) = build_objectives([objective(type="loglik", data=raw, chat_template=True)], ctx)
    (by_hand,) = build_objectives([objective(type="loglik", data=formatted)], ctx)
    (plain,) = build_objectives([objective(type="loglik", data=raw)], ctx)
    assert templated(model, chat_tok) == pytest.approx(by_hand(model, tok), abs=1e-6)
    assert plain(model, tok) != pytest.approx(by_hand(model, tok), abs=1e-6)  # the template mattered
