"""exact_match: teacher-forced accuracy equals true greedy generation; padding and batching do not matter."""

from __future__ import annotations

import pytest

from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate
from tests.objectives.conftest import objective

CTX = ObjectiveContext()


def in_file_order(records: list[dict]) -> list[dict]:
    """Per-example records come in the subset's seeded order; tests compare with the file's."""
    return sorted(records, key=lambda d: d["line"])


def test_forced_equals_generated_per_example(lm, greedy_data):
    model, tok, _ = lm
    path, right = greedy_data
    forced, generated = build_objectives(
        [objective(type="exact_match", name="tf", data=path, batch_size=7),
         objective(type="exact_match", name="gen", data=path, mode="generate", batch_size=5)], CTX)
    scores = evaluate([forced, generated], model, tok)
    assert 0 < scores["tf"] < 1  # some right, some wrong: the two methods could disagree
    assert [d["correct"] for d in in_file_order(forced.last_details)] == right
    assert [d["correct"] for d in in_file_order(generated.last_details)] == right
    assert scores["tf"] == scores["gen"] == sum(right) / len(right)


@pytest.mark.parametrize("kind", ["exact_match", "loglik"])
def test_left_and_right_padding_agree(lm, greedy_data, kind):
    model, tok, _ = lm
    (obj,) = build_objectives([objective(type=kind, data=greedy_data[0], batch_size=8)], CTX)
    right_value = obj(model, tok)
    tok.padding_side = "left"
    try:
        left_value = obj(model, tok)
        one_by_one = build_objectives([objective(type=kind, data=greedy_data[0], batch_size=1)], CTX)[0]
        single = one_by_one(model, tok)
    finally:
        tok.padding_side = "right"
    assert left_value == pytest.approx(right_value, abs=1e-5)
    assert single == pytest.approx(right_value, abs=1e-5)


def test_loglik_against_direct_forward(lm, greedy_data):
    import torch

    model, tok, _ = lm
    (obj,) = build_objectives([objective(type="loglik", data=greedy_data[0], limit=5, per_token=True)], CTX)
    (nll,) = build_objectives([objective(type="loglik", data=greedy_data[0], limit=5, nll=True)], CTX)
    total = count = per_example = 0.0
    for ex in obj.examples:
        p = tok(ex["prompt"])["input_ids"]
        a = tok(ex["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p + a])).logits[0], -1)
        lp = sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(a))
        total, count, per_example = total + lp, count + len(a), per_example + lp / 5
    assert obj(model, tok) == pytest.approx(total / count, rel=1e-5)
    assert nll(model, tok) == pytest.approx(-per_example, rel=1e-5)
    assert (obj.direction, nll.direction) == ("maximize", "minimize")


def test_generate_stop_strings(lm, greedy_data, tmp_path):
    from tests.objectives.conftest import write_jsonl

    model, tok, _ = lm
    # The generated text cut at the first stop string equals its first word, whatever follows.
    first = build_objectives([objective(type="exact_match", data=greedy_data[0], mode="generate")], CTX)[0]
    first(model, tok)
    outputs = [d["output"] for d in in_file_order(first.last_details)]
    rows = [{"prompt": ex["prompt"], "answer": o.split(" ")[0]} for ex, o in zip(first.examples, outputs, strict=True)]
    data = write_jsonl(tmp_path / "first.jsonl", rows)
    (stop,) = build_objectives([objective(type="exact_match", data=data, mode="generate", stop=[" "])], CTX)
    assert stop(model, tok) == 1.0
