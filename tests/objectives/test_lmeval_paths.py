"""lm-eval local tasks whose YAML names its data by relative paths: resolved against the YAML's folder whatever
the working directory, offline; a file that is not there is one line naming the YAML and the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergesearch.errors import DataError
from mergesearch.objectives import ObjectiveContext, build_objectives
from mergesearch.objectives.lmeval import resolved_task_dir
from tests.objectives.conftest import objective

pytest.importorskip("lm_eval")
from lm_eval.tasks._yaml_loader import load_yaml  # what lm-eval reads

REPO = Path(__file__).resolve().parents[2]

TEMPLATE = """dataset_path: json
test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""

# data next to the YAML, the dataset type from a template one folder up, a !function from a module next to it
TASK = """include: ../_template.yaml
task: {name}
dataset_kwargs:
  data_files:
    test: {data}
process_docs: !function utils.keep_even
"""

UTILS = "def keep_even(dataset):\n    return dataset.filter(lambda doc: doc['label'] % 2 == 0)\n"


def _rows(n: int) -> str:
    return "".join(json.dumps({"query": f"q{i}", "choices": ["a", "b"], "label": i % 2}) + "\n" for i in range(n))


@pytest.fixture
def tasks(tmp_path: Path, monkeypatch) -> Path:
    """``tasks/`` with two tasks in ``tasks/sub/`` (data next to the YAML, and in a subfolder); the working
    directory is another folder holding decoys of the same relative names (the cwd must not be read)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tasks"
    (root / "sub" / "data").mkdir(parents=True)
    (root / "_template.yaml").write_text(TEMPLATE)
    (root / "sub" / "utils.py").write_text(UTILS)
    (root / "sub" / "near.yaml").write_text(TASK.format(name="near", data="near.jsonl"))
    (root / "sub" / "near.jsonl").write_text(_rows(6))
    (root / "sub" / "deep.yaml").write_text(TASK.format(name="deep", data="data/deep.jsonl"))
    (root / "sub" / "data" / "deep.jsonl").write_text(_rows(10))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "near.jsonl").write_text(_rows(40))
    (elsewhere / "data" / "deep.jsonl").write_text(_rows(40))
    monkeypatch.chdir(elsewhere)
    return root


def _docs(task_dict) -> int:
    (task,) = task_dict.values()
    return len(task.test_docs())


@pytest.mark.parametrize(("task", "kept"), [("near", 3), ("deep", 5)])
def test_relative_data_files_resolve_next_to_the_yaml_not_the_cwd(tasks: Path, task: str, kept: int) -> None:
    (obj,) = build_objectives([objective(type="lm_eval", name="t", task=task, include_path=tasks)],
                              ObjectiveContext())
    assert _docs(obj.task_dict) == kept  # the YAML's own rows (the cwd's decoys have 40), !function applied


def test_missing_relative_data_file_is_one_line_naming_yaml_and_file(tasks: Path) -> None:
    (tasks / "sub" / "gone.yaml").write_text(TASK.format(name="gone", data="data/absent.jsonl"))
    (Path.cwd() / "data" / "absent.jsonl").write_text(_rows(4))  # in the cwd only: must not be found there
    with pytest.raises(DataError) as e:
        build_objectives([objective(type="lm_eval", name="t", task="gone", include_path=tasks)], ObjectiveContext())
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"objective 't': lm-eval task YAML {tasks / 'sub' / 'gone.yaml'}: data file "
                          "'data/absent.jsonl' not found")
    assert str(tasks / "sub" / "data" / "absent.jsonl") in msg
    # the other tasks of the folder still load: a broken YAML fails only the task that uses it
    (obj,) = build_objectives([objective(type="lm_eval", name="t", task="near", include_path=tasks)],
                              ObjectiveContext())
    assert _docs(obj.task_dict) == 3


def test_mirror_rewrites_only_local_paths_and_goes_away(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "_base.yaml").write_text(TEMPLATE)
    (root / "x.jsonl").write_text(_rows(2))
    (root / "local.yaml").write_text("include: ../shared/_base.yaml\ntask: local\n"
                                     "dataset_kwargs: {data_files: {test: x.jsonl}}\n"
                                     "process_docs: !function utils.keep_even\n")
    # a hub dataset: its data_files and data_dir are inside its repository, not on this disk
    hub = "task: hub\ndataset_path: org/name\ndataset_kwargs: {data_dir: sub, data_files: {test: t.jsonl}}\n"
    (root / "hub.yaml").write_text(hub)
    (root / "notes.txt").write_text("kept")
    with resolved_task_dir(root) as (mirror, missing):
        assert mirror != root and missing == []
        # as lm-eval reads it: the include outside the mirror found (made absolute), !function kept
        local = load_yaml(mirror / "local.yaml", resolve_func=False)
        assert local["dataset_kwargs"] == {"data_files": {"test": str(root / "x.jsonl")}}
        assert local["dataset_path"] == "json" and local["task"] == "local"
        assert local["process_docs"] == str(mirror / "utils.keep_even")
        assert (mirror / "hub.yaml").read_text() == hub  # byte for byte
        assert (mirror / "notes.txt").read_text() == "kept"
    assert not mirror.exists()
    # nothing to rewrite: the folder itself
    (root / "local.yaml").unlink()
    with resolved_task_dir(root) as (same, missing):
        assert same == root and missing == []


def test_config_example_reads_the_demo_data_from_the_repository(tmp_path: Path, monkeypatch) -> None:
    """configs/lmeval_tasks names the demo's data relative to itself: the same file from any folder."""
    monkeypatch.chdir(tmp_path)
    tasks = REPO / "configs" / "lmeval_tasks"
    expected = REPO / "mergesearch-demo" / "data" / "reverse.jsonl"
    with resolved_task_dir(tasks) as (mirror, missing):
        text = (mirror / "demo_reverse.yaml").read_text()
    assert f"test: {expected}" in text
    assert missing == ([] if expected.exists() else [missing[0]]) and all(m.looked == expected for m in missing)
