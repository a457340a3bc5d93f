"""lm_eval adapter on a tiny local multiple-choice task (local YAML + JSONL, no downloads)."""

from __future__ import annotations

import pytest

from mergesearch.errors import ConfigError
from mergesearch.objectives import ObjectiveContext, build_objectives
from tests.objectives.conftest import make_prompts, objective, write_jsonl

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm_eval's HFLM imports it

TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"query": p, "choices": ["1 2", "3", "4 5 6", "= 7"], "label": i % 4}
            for i, p in enumerate(make_prompts(12, seed=3))]
    data = write_jsonl(tmp_path / "tiny.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


@pytest.mark.slow
def test_lm_eval_matches_choice_objective(lm, task_dir):
    model, tok, _ = lm
    ours = {m: objective(type="choice", name=f"ours_{m}", data=task_dir / "tiny.jsonl",
                         length_norm="none" if m == "acc" else "chars") for m in ("acc", "acc_norm")}
    theirs = {m: objective(type="lm_eval", name=f"lm_{m}", task="tiny_choice", metric=m,
                           include_path=task_dir / "tasks", num_fewshot=0) for m in ("acc", "acc_norm")}
    objs = build_objectives([*ours.values(), *theirs.values()], ObjectiveContext())
    values = {o.name: o(model, tok) for o in objs}
    assert values["lm_acc"] == pytest.approx(values["ours_acc"])
    assert values["lm_acc_norm"] == pytest.approx(values["ours_acc_norm"])
    assert values["lm_acc"] == objs[2](model, tok)  # a second call on the same built task works


@pytest.mark.slow  # indexes all of lm-eval's built-in tasks (~30 s)
def test_lm_eval_unknown_task(task_dir):
    cfg = objective(type="lm_eval", task="no_such_task", include_path=task_dir / "tasks")
    with pytest.raises(ConfigError, match="unknown lm-eval task 'no_such_task'"):
        build_objectives([cfg], ObjectiveContext())


@pytest.mark.slow
def test_lm_eval_documents_nest_and_aggregate_like_lm_eval(lm, task_dir):
    from lm_eval.evaluator import evaluate

    model, tok, _ = lm
    cfg = objective(type="lm_eval", name="lm", task="tiny_choice", metric="acc", include_path=task_dir / "tasks",
                    num_fewshot=0, limit=8, seed=1)
    (obj,) = build_objectives([cfg], ObjectiveContext())
    assert obj.size() == 8 == len(set(obj.docs))  # a seeded subset of the 12 documents
    full = obj.score(model, tok)
    # rung subsets: documents [0, 3) then [3, 8) are exactly the full set's records, in order
    assert obj.score(model, tok, 0, 3) + obj.score(model, tok, 3, 8) == full
    # the objective equals lm-eval's own result on the same documents
    out = evaluate(lm=obj._wrapper(model, tok), task_dict=obj.task_dict, samples={"tiny_choice": obj.docs},
                   bootstrap_iters=0, log_samples=False, verbosity="ERROR")
    assert obj(model, tok) == pytest.approx(out["results"]["tiny_choice"]["acc,none"])
    assert obj.reduce(full[:3]) == pytest.approx(sum(r["value"] for r in full[:3]) / 3)
