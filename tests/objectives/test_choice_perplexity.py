"""choice on hand-built cases with known answers; perplexity against direct computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mergesearch.objectives import ObjectiveContext, build_objectives
from mergesearch.objectives.perplexity import windows
from tests.objectives.conftest import make_prompts, objective, write_jsonl

CTX = ObjectiveContext()
SYMBOLS = [str(d) for d in range(1, 10)] + ["=", "+", ":"]  # "0" is EOS's output row in the test model


def in_file_order(records: list[dict]) -> list[dict]:
    """Per-example records come in the subset's seeded order; tests compare with the file's."""
    return sorted(records, key=lambda d: d["line"])


def next_token_ranking(model, tok, prompt: str) -> list[str]:
    """Single symbols ranked by the model's next-token logit after ``prompt`` (best first)."""
    with torch.no_grad():
        logits = model(torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1]
    return sorted(SYMBOLS, key=lambda s: -float(logits[tok.convert_tokens_to_ids(s)]))


def test_choice_single_token_known_answer(lm, tmp_path):
    model, tok, _ = lm
    rows = []
    for i, prompt in enumerate(make_prompts(12, seed=1)):
        ranking = next_token_ranking(model, tok, prompt)
        choices = [ranking[-1], ranking[0], ranking[3]]  # worst, best, 4th: the best is the answer
        rows.append({"query" if i % 2 else "prompt": prompt, "choices": choices, "label": 1 if i < 8 else 2})
    (obj,) = build_objectives([objective(type="choice", data=write_jsonl(tmp_path / "c.jsonl", rows))], CTX)
    assert obj(model, tok) == pytest.approx(8 / 12)
    assert [d["pred"] for d in in_file_order(obj.last_details)] == [1] * 12


def test_choice_length_norm_against_direct(lm, tmp_path):
    model, tok, _ = lm
    rng = random.Random(0)
    rows = [{"prompt": p, "choices": [" ".join(rng.choices(SYMBOLS, k=k)) for k in (1, 2, 4)], "label": 0}
            for p in make_prompts(10, seed=2)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    for norm in ("none", "chars", "tokens"):
        (obj,) = build_objectives([objective(type="choice", data=data, length_norm=norm, batch_size=4)], CTX)
        acc = obj(model, tok)
        expected = []
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            scores = []
            for c in r["choices"]:
                a = tok(" " + c, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0], -1)
                lp = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
                scores.append(lp / {"none": 1, "chars": len(c), "tokens": len(a)}[norm])
            expected.append(max(range(3), key=lambda j, s=scores: s[j]))
        assert [d["pred"] for d in in_file_order(obj.last_details)] == expected
        assert acc == pytest.approx(sum(e == 0 for e in expected) / len(rows))


def random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(SYMBOLS) for _ in range(n_words))


def direct_nll(model, ids: list[int]) -> float:
    """Sum of -log p(token_t | tokens_<t) for t >= 1, one forward pass."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    return float(out.loss) * (len(ids) - 1)


def test_perplexity_short_texts_equal_direct(lm, tmp_path):
    model, tok, _ = lm
    texts = [random_text(n, seed=n) for n in (5, 12, 20)]
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    (obj,) = build_objectives([objective(type="perplexity", data=data)], CTX)
    ids = [tok(t)["input_ids"] for t in texts]
    expected = math.exp(sum(direct_nll(model, i) for i in ids) / sum(len(i) - 1 for i in ids))
    assert obj(model, tok) == pytest.approx(expected, rel=1e-5)
    assert obj.direction == "minimize"


def test_perplexity_sliding_window_equals_manual(lm, tmp_path):
    model, tok, _ = lm
    text = random_text(70, seed=0)  # 71 tokens with BOS: longer than the model's 32 positions
    (tmp_path / "t.txt").write_text(text)
    (txt,) = build_objectives([objective(type="perplexity", data=tmp_path / "t.txt", window=16, stride=6)], CTX)
    ids = tok(text)["input_ids"]
    nll, n = 0.0, 0
    for t in range(1, len(ids)):  # token t is in chunk [s, s+6) of targets; its window ends at min(s+6, n)
        s = 1 + 6 * ((t - 1) // 6)
        begin = max(0, min(s + 6, len(ids)) - 16)
        with torch.no_grad():
            logits = model(torch.tensor([ids[begin:t]])).logits[0, -1]
        nll -= float(torch.log_softmax(logits, -1)[ids[t]])
        n += 1
    assert n == len(ids) - 1
    assert txt(model, tok) == pytest.approx(math.exp(nll / n), rel=1e-5)


@pytest.mark.parametrize(("n", "window", "stride"), [(2, 2, 1), (10, 4, 4), (11, 4, 3), (50, 16, 1), (7, 32, 8)])
def test_windows_predict_every_token_once(n, window, stride):
    ids = list(range(n))
    targets = []
    for ctx, tgt in windows(ids, window, stride):
        assert len(ctx) + len(tgt) <= window and ctx and ctx[-1] + 1 == tgt[0]
        assert len(tgt) == min(stride, window - 1) or tgt[-1] == n - 1
        targets += tgt
    assert targets == ids[1:]
