"""`search.initial`: a partial parameter dict is completed with the space's defaults, never sampled."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergesearch.config import load_config
from mergesearch.errors import ConfigError
from mergesearch.search.loop import SearchRun
from tests.conftest import write_job


def _run_with_initial(tmp_path: Path, tiny_models, initial: str, seed: int) -> SearchRun:
    job = write_job(tmp_path / f"s{seed}", tiny_models)
    job.write_text(job.read_text().replace("seed: 0}", f"seed: {seed}, initial: [{initial}]}}"))
    return SearchRun(load_config(job), storage="memory://", study_name="i", trials=1)


def test_partial_initial_dict_takes_the_space_defaults(tiny_models, tmp_path: Path) -> None:
    points = [_run_with_initial(tmp_path, tiny_models, "{method: ties}", seed)._initial for seed in (0, 1)]
    assert points[0] == points[1]  # not sampled: the same recipe whatever the seed
    (p,) = points[0]
    assert p["method"] == "ties"
    # the documented defaults: weight 1, density 1 (clamped into [0.2, 1])
    assert {k: v for k, v in p.items() if k != "method"} == {"weight.0": 1.0, "weight.1": 1.0,
                                                              "density.0": 1.0, "density.1": 1.0}


def test_partial_initial_dict_is_enqueued_complete(tiny_models, tmp_path: Path) -> None:
    run = _run_with_initial(tmp_path, tiny_models, "{method: ties, weight.0: 0.3}", 0)
    run.prepare()
    (trial,) = run.study.trials
    assert trial.system_attrs["fixed_params"] == {"method": "ties", "weight.0": 0.3, "weight.1": 1.0,
                                                  "density.0": 1.0, "density.1": 1.0}


def test_initial_dict_out_of_range_names_its_index(tiny_models, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search.initial\[0\]: weight.0=2"):
        _run_with_initial(tmp_path, tiny_models, "{weight.0: 2.0}", 0)
