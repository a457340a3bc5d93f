"""An lm-eval task whose dataset lives on the hub, offline: one line naming the objective, the task and the
host's (here: offline mode's) reply — not a bare `ConnectionError`."""

from __future__ import annotations

import pytest

from mergesearch.errors import DataError
from mergesearch.objectives import ObjectiveContext, build_objectives
from tests.objectives.conftest import objective

pytest.importorskip("lm_eval")

HUB_TASK = """task: hub_choice
dataset_path: no-such-org/no-such-dataset
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""


def test_hub_task_offline_is_one_line_naming_task_and_reply(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hub_choice.yaml").write_text(HUB_TASK)
    cfg = objective(type="lm_eval", name="arc", task="hub_choice", include_path=tmp_path / "tasks")
    with pytest.raises(DataError) as e:
        build_objectives([cfg], ObjectiveContext())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("objective 'arc': lm-eval task 'hub_choice' could not load its data: ")
    assert "Error" in msg.split(": ", 2)[2]  # the failure's type, then the host's own words
