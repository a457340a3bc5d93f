"""Synthetic tasks, their deterministic splits, and the token layout of training and scoring."""

from __future__ import annotations

import random

import pytest

from mergesearch.demo.check import IGNORE, encode
from mergesearch.demo.tasks import EXPERT_TASKS, TASKS, eval_splits, make_example, sample_examples, task_token
from mergesearch.demo.tokenizer import build_tokenizer


@pytest.mark.parametrize(("task", "answer"), [
    ("reverse", "5 1 4 1 3"), ("swap", "1 3 1 4 5"), ("sort", "1 1 3 4 5"), ("copy", "3 1 4 1 5"),
    ("rotate", "4 1 5 3 1"), ("desc", "5 4 3 1 1"), ("min", "1"),
])
def test_task_answers(task: str, answer: str) -> None:
    assert make_example(task, (3, 1, 4, 1, 5)) == {"prompt": f"<{task}> 3 1 4 1 5 =", "answer": answer}


def test_swap_even_length() -> None:
    assert TASKS["swap"]((1, 2, 3, 4)) == (2, 1, 4, 3)


def test_splits_deterministic_disjoint_and_seeded() -> None:
    search, test = eval_splits("reverse", seed=0, length=4)
    assert (len(search), len(test)) == (128, 512)
    assert (search, test) == eval_splits("reverse", seed=0, length=4)
    prompts = [r["prompt"] for r in search + test]
    assert len(set(prompts)) == len(prompts)  # distinct inputs, so the splits are disjoint
    assert eval_splits("reverse", seed=1, length=4)[0] != search
    assert [r["prompt"].split()[1:] for r in eval_splits("swap", seed=0, length=4)[0]] != [
        p.split()[1:] for p in prompts[:128]]  # tasks draw their own inputs


def test_training_samples_avoid_held_out_inputs() -> None:
    exclude = {(d,) for d in range(9)}  # every 1-digit input but 9
    out = sample_examples("copy", 20, random.Random(0), length=1, exclude=exclude)
    assert {r["prompt"] for r in out} == {"<copy> 9 ="}


def test_encode_layout_and_tokenizer_round_trip() -> None:
    tok = build_tokenizer([task_token(t) for t in TASKS])
    rec = [make_example("min", (3, 1, 4, 1, 5)), make_example("reverse", (3, 1, 4, 1, 5))]
    ids, labels = encode(tok, rec)
    assert ids.shape == labels.shape == (2, 14)  # <bos> <task> 5 digits = 5 digits <eos>
    assert tok.convert_ids_to_tokens(ids[1].tolist()) == [
        "<bos>", "<reverse>", "3", "1", "4", "1", "5", "=", "5", "1", "4", "1", "3", "<eos>"]
    assert tok.convert_ids_to_tokens(ids[0].tolist())[-6:] == ["1", "<eos>", *["<pad>"] * 4]
    # loss only on the answer and <eos>
    assert labels[1].tolist() == [IGNORE] * 8 + ids[1, 8:].tolist()
    assert labels[0].tolist() == [IGNORE] * 8 + [ids[0, 8].item(), tok.eos_token_id] + [IGNORE] * 4
    assert tok.decode(tok(rec[1]["prompt"])["input_ids"]) == "<bos> " + rec[1]["prompt"]
    assert tok.decode(tok(rec[1]["prompt"])["input_ids"], skip_special_tokens=True) == rec[1]["prompt"]


def test_expert_tasks_are_tasks() -> None:
    assert set(EXPERT_TASKS) <= set(TASKS)
