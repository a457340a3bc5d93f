"""evaluate_model_dir: what `mergesearch eval` calls, on a saved HF folder."""

from __future__ import annotations

import pytest

from mergesearch.errors import ModelError
from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate, evaluate_model_dir
from tests.objectives.conftest import objective


def test_saved_dir_scores_like_the_resident_model(lm, greedy_data, tiny_models):
    model, tok, path = lm
    data, right = greedy_data
    configs = [objective(type="exact_match", name="em", data=data, test=data),
               objective(type="loglik", name="ll", data=data),
               objective(type="l1_from_base", name="l1")]
    resident = evaluate(build_objectives(configs[:2], ObjectiveContext()), model, tok)
    saved = evaluate_model_dir(str(path), configs, base_model=str(path))
    assert saved == pytest.approx({**resident, "l1": 0.0})
    assert saved["em"] == sum(right) / len(right)
    # An expert against its base: its noise (std 0.02) gives a positive distance; the held-out split works too.
    expert = evaluate_model_dir(str(tiny_models["a"]), [configs[0], configs[2]], split="test",
                                base_model=str(tiny_models["base"]))
    assert expert["l1"] > 0 and 0 <= expert["em"] <= 1


def test_missing_model_and_base(tmp_path, greedy_data):
    cfg = [objective(type="l1_from_base", name="l1")]
    with pytest.raises(ModelError, match="no_model"):
        evaluate_model_dir(str(tmp_path / "no_model"), [objective(type="params")])
    with pytest.raises(ModelError, match="no_base"):
        evaluate_model_dir(str(tmp_path), cfg, base_model=str(tmp_path / "no_base"))
