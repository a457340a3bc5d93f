"""Bad input: each a one-line error of our types, naming the culprit."""

from __future__ import annotations

import pytest

from mergesearch.errors import ConfigError, DataError, MergeSearchError, TrialError
from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate, validate_objective
from tests.objectives.conftest import objective


def error_of(cfg, split="search") -> MergeSearchError:
    with pytest.raises(MergeSearchError) as info:
        build_objectives([cfg], ObjectiveContext(split=split))
    assert "\n" not in str(info.value)
    return info.value


def test_missing_data_file(tmp_path):
    err = error_of(objective(type="exact_match", data=tmp_path / "nope.jsonl"))
    assert isinstance(err, DataError) and str(err) == f"{tmp_path / 'nope.jsonl'}: data file not found"


def test_malformed_jsonl_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    err = error_of(objective(type="exact_match", data=path))
    assert isinstance(err, DataError) and str(err).startswith(f"{path}:3: malformed JSON")


def test_missing_field_names_line_and_field(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    err = error_of(objective(type="exact_match", data=path))
    assert isinstance(err, DataError) and str(err) == f"{path}:2: missing field 'answer'"
    path.write_text('{"prompt": "a", "choices": ["x"], "label": 0}\n{"choices": ["x"], "label": 0}\n')
    assert str(error_of(objective(type="choice", data=path))) == f"{path}:2: missing field 'prompt|query'"


def test_bad_field_values(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "a", "choices": ["x", "y"], "label": 2}\n')
    assert "c.jsonl:1: 'label' must be an int in [0, 2)" in str(error_of(objective(type="choice", data=path)))
    path.write_text('{"prompt": 3, "answer": "1"}\n')
    assert "c.jsonl:1: field 'prompt' must be a string" in str(error_of(objective(type="exact_match", data=path)))


@pytest.mark.parametrize(("kind", "name"), [("exact_match", "e.jsonl"), ("perplexity", "e.txt")])
def test_empty_dataset(tmp_path, kind, name):
    (tmp_path / name).write_text("\n  \n")
    err = error_of(objective(type=kind, data=tmp_path / name))
    assert isinstance(err, DataError) and "empty dataset" in str(err)


def test_unknown_type_suggests():
    with pytest.raises(ConfigError, match=r"unknown type 'exact_mach' \(did you mean 'exact_match'\?\); known: "):
        validate_objective(objective(type="exact_mach", data="x.jsonl"))


def test_unknown_and_invalid_keys():
    with pytest.raises(ConfigError, match=r"'em': unknown key 'max_new_token' .*'max_new_tokens'"):
        validate_objective(objective(type="exact_match", name="em", data="x.jsonl", max_new_token=3))
    with pytest.raises(ConfigError, match=r"objective 'exact_match': mode: Input should be 'forced' or 'generate'"):
        validate_objective(objective(type="exact_match", data="x.jsonl", mode="sample"))
    with pytest.raises(ConfigError, match=r"objective 'perplexity': type 'perplexity' needs a 'data' file"):
        validate_objective(objective(type="perplexity"))
    with pytest.raises(ConfigError, match=r"stride \(9\) > window \(4\)"):
        validate_objective(objective(type="perplexity", data="x.txt", window=4, stride=9))


def test_test_split_without_test_file(tmp_path):
    err = error_of(objective(type="loglik", data=tmp_path / "x.jsonl"), split="test")
    assert isinstance(err, ConfigError) and "needs a 'test' file for the test split" in str(err)


@pytest.mark.parametrize("target", ["no_such_module_xyz:f", "tests.support.objective_fns:nope", "bad_target",
                                    "/nowhere/file.py:f"])
def test_python_target_that_does_not_import(target):
    err = error_of(objective(type="python", target=target))
    assert isinstance(err, ConfigError) and f"'{target}'" in str(err)


def test_non_finite_score_is_a_trial_error(lm):
    model, tok, _ = lm
    objs = build_objectives([objective(type="python", target="math:log")], ObjectiveContext())
    objs[0].function = lambda m, t, e: float("inf")
    with pytest.raises(TrialError, match="objective 'python' returned inf"):
        evaluate(objs, model, tok)
