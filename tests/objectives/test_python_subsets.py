"""python objectives; deterministic subsets (same examples in every call and process); config validation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mergesearch.objectives import ObjectiveContext, build_objectives, validate_objective
from mergesearch.objectives.data import subset
from tests.objectives.conftest import objective, write_jsonl

CTX = ObjectiveContext()

SCORER = '''
def score(model, tokenizer, examples):
    """Sum of the example ids plus the vocabulary size: depends on every argument."""
    return sum(ex["id"] for ex in examples) + model.config.vocab_size + len(tokenizer)
'''


@pytest.fixture
def rows_file(tmp_path):
    return write_jsonl(tmp_path / "rows.jsonl", [{"id": i, "prompt": f"<sort> {i % 10} =", "answer": "1"}
                                                 for i in range(50)])


def test_python_objective_from_file_and_module(lm, rows_file, tmp_path):
    model, tok, _ = lm
    (tmp_path / "my_scorer.py").write_text(SCORER)
    from_file, from_module = build_objectives(
        [objective(type="python", name="f", data=rows_file, target=f"{tmp_path / 'my_scorer.py'}:score"),
         objective(type="python", name="m", target="tests.support.objective_fns:slow_norm")], CTX)
    assert from_file(model, tok) == sum(range(50)) + 20 + 20
    assert from_module(model, tok) == pytest.approx(float(model.lm_head.weight.detach().norm()))
    assert from_module.examples == []  # no data file: no examples


def test_subset_same_across_calls_and_processes(rows_file):
    cfg = objective(type="python", data=rows_file, limit=7, seed=3, target="tests.support.objective_fns:slow_norm")
    ids = [ex["id"] for ex in build_objectives([cfg], CTX)[0].examples]
    again = [ex["id"] for ex in build_objectives([cfg], CTX)[0].examples]
    code = (f"from mergesearch.objectives.data import read_jsonl, subset; from pathlib import Path; "
            f"ex = read_jsonl(Path({str(rows_file)!r})); "
            f"print([ex[i]['id'] for i in subset(len(ex), 7, 3)])")
    other = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                      check=True).stdout)
    assert ids == again == other
    assert len(ids) == 7 and len(set(ids)) == 7 and ids != sorted(ids)  # a seeded random order, not a head
    assert subset(50, 7, 4) != subset(50, 7, 3)
    assert sorted(subset(5, 7, 3)) == sorted(subset(5, None, 3)) == [0, 1, 2, 3, 4]
    # fidelity rungs: a smaller limit is a prefix of a larger one, and of the unlimited order
    assert subset(50, 30, 3)[:7] == subset(50, 7, 3) == subset(50, None, 3)[:7]


def test_exact_match_subset_scores_the_chosen_examples(lm, greedy_data):
    model, tok, _ = lm
    path, right = greedy_data
    (obj,) = build_objectives([objective(type="exact_match", data=path, limit=10, seed=1)], CTX)
    chosen = subset(len(right), 10, 1)
    assert obj(model, tok) == pytest.approx(sum(right[i] for i in chosen) / 10)
    assert obj(model, tok) == obj(model, tok)


def test_directions_default_and_override(rows_file):
    text = rows_file.with_suffix(".txt")
    text.write_text("1 2 3")
    objs = build_objectives([
        objective(type="exact_match", name="a", data=rows_file),
        objective(type="exact_match", name="b", data=rows_file, direction="minimize"),
        objective(type="perplexity", name="c", data=text),
        objective(type="params", name="d"),
    ], CTX)
    assert [o.direction for o in objs] == ["maximize", "minimize", "minimize", "minimize"]
    assert [o.name for o in objs] == ["a", "b", "c", "d"]


def test_validate_objective_accepts_good_configs(rows_file):
    validate_objective(objective(type="exact_match", data=rows_file, mode="generate", stop=["\n"], max_new_tokens=4))
    validate_objective(objective(type="latency", batch=2, length=8))
