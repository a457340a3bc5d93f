"""Fixtures for objective tests: a tiny random Llama whose greedy outputs end with EOS on many prompts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesearch.config import ObjectiveConfig
from tests.conftest import make_tiny_llama

# Output row of "0" swapped with EOS's: this random model then emits EOS after 2-7 tokens on ~2/3 of prompts
# (found by trying every token), which gives exact-match data with real right and wrong multi-token answers.
EOS_SWAP = "0"


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"<reverse> {' '.join(str(rng.randrange(10)) for _ in range(rng.randint(2, 6)))} =" for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def objective(**fields: Any) -> ObjectiveConfig:
    return ObjectiveConfig.model_validate(fields)


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> tuple[Any, Any, Path]:
    """(model, tokenizer, saved dir) of the tiny Llama with EOS's output row swapped in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("lm") / "m", seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    swap = tok.convert_tokens_to_ids(EOS_SWAP)
    with torch.no_grad():
        w = model.lm_head.weight
        w[[tok.eos_token_id, swap]] = w[[swap, tok.eos_token_id]].clone()
    model.save_pretrained(path)
    return model.eval(), tok, path


@pytest.fixture(scope="session")
def greedy_data(lm, tmp_path_factory) -> tuple[Path, list[bool]]:
    """Prompt/answer JSONL built from the model's own greedy outputs, and which answers are right.

    Right: the full greedy output before EOS. Wrong: last token changed; last token dropped (a correct prefix,
    so only the EOS check catches it); outputs that never reach EOS (first 3 tokens).
    """
    model, tok, _ = lm
    rows, right = [], []
    for i, prompt in enumerate(make_prompts(40, seed=0)):
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if any(t < 4 and t != tok.eos_token_id for t in out):
            continue  # special tokens (<bos>, <pad>) vanish when generated text is decoded: not comparable
        if tok.eos_token_id in out and out.index(tok.eos_token_id) >= 2:
            ans = out[: out.index(tok.eos_token_id)]
            if i % 3 == 1:
                ans = [*ans[:-1], 4 + (ans[-1] - 3) % (len(tok) - 4)]  # another non-special token
            elif i % 3 == 2:
                ans = ans[:-1]
            ok = i % 3 == 0
        else:
            ans, ok = out[:3], False
        rows.append({"prompt": prompt, "answer": tok.decode(ans)})
        right.append(ok)
    return write_jsonl(tmp_path_factory.mktemp("data") / "greedy.jsonl", rows), right
