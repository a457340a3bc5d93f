"""Pareto front, hypervolume and renderings on hand-built Optuna studies whose answers are known."""

from __future__ import annotations

import csv
import io
import itertools
import json

import numpy as np
import optuna
import pytest
from rich.console import Console

from mergesearch.errors import ConfigError, StudyError
from mergesearch.search.pareto import (
    Front,
    default_reference_point,
    front_table,
    front_to_csv,
    front_to_json,
    hypervolume,
    hypervolume_history,
    load_front,
    non_dominated,
    render_table,
    study_hypervolume,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
DIST = {"w": optuna.distributions.FloatDistribution(0.0, 1.0)}
TS = optuna.trial.TrialState


def add(study: optuna.Study, values: list[float] | None, state: TS = TS.COMPLETE, w: float = 0.5,
        constraints: list[float] | None = None, **user_attrs: object) -> None:
    system_attrs = {} if constraints is None else {"constraints": constraints}
    study.add_trial(optuna.trial.create_trial(
        state=state, values=values, params={"w": w} if state != TS.RUNNING else {}, distributions=DIST
        if state != TS.RUNNING else {}, user_attrs=dict(user_attrs), system_attrs=system_attrs))


# acc is maximised, size minimised. Non-dominated: 0, 1, 5. Dominated: 2 (by 1), 3 (by 5), 4 (by 0).
# Trial 6 would dominate everything but violates its constraint; 7 failed; 8 running.
MIXED = [(0.9, 5.0), (0.8, 3.0), (0.7, 4.0), (0.5, 1.0), (0.9, 6.0), (0.6, 1.0)]


@pytest.fixture
def mixed_study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["acc", "size"])
    for i, v in enumerate(MIXED):
        add(study, list(v), w=i / 10, constraints=[-1.0], plan={"merge_method": "linear", "i": i},
            summary=f"linear #{i}")
    add(study, [1.0, 0.5], constraints=[0.3], summary="infeasible")
    add(study, None, state=TS.FAIL)
    add(study, None, state=TS.RUNNING)
    return study


def test_front_is_known_non_dominated_set_mixed_directions(mixed_study: optuna.Study) -> None:
    front = load_front(mixed_study)
    assert front.objectives == [("acc", "maximize"), ("size", "minimize")]
    assert [t.number for t in front.trials] == [0, 1, 5]  # sorted by acc, best first
    assert front.trials[1].values == {"acc": 0.8, "size": 3.0}
    assert front.trials[1].plan == {"merge_method": "linear", "i": 1}
    assert front.trials[1].summary == "linear #1"
    assert front.trials[1].params == {"w": 0.1}
    assert front.counts == {"complete": 7, "failed": 1, "running": 1, "total": 9, "pruned": 0, "examples": 0}
    # the infeasible trial is excluded from the reference point too: acc worst 0.5, size worst 6.0
    assert front.reference_point == pytest.approx({"acc": 0.5 - 0.04, "size": 6.0 + 0.5})
    assert front.all_values.shape == (6, 2)


def test_library_sorting_agrees_with_optuna_on_random_3d() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((80, 3))
    dirs = ["maximize", "minimize", "maximize"]
    study = optuna.create_study(directions=dirs)
    for v in values:
        add(study, list(v))
    expected = sorted(t.number for t in study.best_trials)
    assert non_dominated(values, dirs).tolist() == expected
    assert sorted(t.number for t in load_front(study).trials) == expected
    assert 3 < len(expected) < 80


def test_hypervolume_closed_form_staircase() -> None:
    # minimise both: points (i, n+1-i), reference (n+1, n+1) → the staircase covers 1 + 2 + ... + n
    n = 6
    pts = np.array([[i, n + 1 - i] for i in range(1, n + 1)], dtype=float)
    ref = [n + 1.0, n + 1.0]
    assert hypervolume(pts, ["minimize", "minimize"], ref) == pytest.approx(n * (n + 1) / 2)
    # maximised first objective: negate it and the reference, same volume
    mixed = pts * [-1.0, 1.0]
    assert hypervolume(mixed, ["maximize", "minimize"], [-(n + 1.0), n + 1.0]) == pytest.approx(21.0)
    # a dominated point and a point beyond the reference add nothing
    extra = np.vstack([pts, [[4.0, 5.0], [0.5, 8.0]]])
    assert hypervolume(extra, ["minimize", "minimize"], ref) == pytest.approx(21.0)
    assert hypervolume(np.zeros((0, 2)), ["minimize", "minimize"], ref) == 0.0


def test_front_hypervolume_and_reference_from_config(mixed_study: optuna.Study) -> None:
    ref = {"acc": 0.0, "size": 10.0}
    front = load_front(mixed_study, reference_point=ref)
    # boxes from (acc, size) up to acc=0, size=10: (0.6,1) → 0.6*9; (0.8,3) adds 0.2*7; (0.9,5) adds 0.1*5
    assert front.hypervolume == pytest.approx(0.6 * 9 + 0.2 * 7 + 0.1 * 5)
    assert front.reference_point == ref
    assert study_hypervolume(mixed_study, [0.0, 10.0]) == pytest.approx(front.hypervolume)
    partial = load_front(mixed_study, reference_point={"size": 10.0})
    assert partial.reference_point == pytest.approx({"acc": 0.46, "size": 10.0})
    with pytest.raises(ConfigError, match=r"unknown objective.*loss.*known: acc, size"):
        load_front(mixed_study, reference_point={"loss": 1.0})
    with pytest.raises(ConfigError, match="needs 2 values"):
        study_hypervolume(mixed_study, [1.0])


def test_default_reference_point_margin() -> None:
    v = np.array([[1.0, 10.0], [3.0, 30.0]])
    assert default_reference_point(v, ["maximize", "minimize"]) == pytest.approx([0.8, 32.0])
    assert default_reference_point(v[:1], ["maximize", "minimize"]) == pytest.approx([0.9, 11.0])


def test_hypervolume_history_matches_prefix_volumes() -> None:
    rng = np.random.default_rng(1)
    values = rng.random((40, 2))
    dirs = ["maximize", "minimize"]
    study = optuna.create_study(directions=dirs)
    add(study, None, state=TS.FAIL)  # failed trials do not count
    for v in values:
        add(study, list(v))
    ref = default_reference_point(values, dirs)
    history = hypervolume_history(study)
    assert len(history) == 40
    expected = [hypervolume(values[:k], dirs, ref) for k in range(1, 41)]
    assert history == pytest.approx(expected)
    assert all(b >= a for a, b in itertools.pairwise(history))
    assert history[-1] == pytest.approx(load_front(study).hypervolume)


def test_json_exact_shape(mixed_study: optuna.Study) -> None:
    out = front_to_json(load_front(mixed_study, reference_point={"acc": 0.0, "size": 10.0}))
    assert list(out)[:3] == ["objectives", "hypervolume", "front"]
    assert out["objectives"] == [{"name": "acc", "direction": "maximize"}, {"name": "size", "direction": "minimize"}]
    # each point carries what it is made of: its params and its recipe (the stored plan)
    assert all(set(p) >= {"params", "recipe"} for p in out["front"])
    assert [{k: v for k, v in p.items() if k not in ("params", "recipe")} for p in out["front"]] == [
        {"trial": 0, "values": {"acc": 0.9, "size": 5.0}},
        {"trial": 1, "values": {"acc": 0.8, "size": 3.0}},
        {"trial": 5, "values": {"acc": 0.6, "size": 1.0}}]
    assert json.loads(json.dumps(out)) == out


def test_csv_round_trip_and_table(mixed_study: optuna.Study) -> None:
    front = load_front(mixed_study)
    rows = list(csv.reader(io.StringIO(front_to_csv(front))))
    assert rows[0] == ["trial", "acc", "size", "plan"]
    assert [(int(r[0]), float(r[1]), float(r[2]), r[3]) for r in rows[1:]] == [
        (0, 0.9, 5.0, "linear #0"), (1, 0.8, 3.0, "linear #1"), (5, 0.6, 1.0, "linear #5")]
    console = Console(record=True, width=160)
    console.print(front_table(front))
    for text in (console.export_text(), render_table(front, width=160)):
        assert "acc ↑" in text and "size ↓" in text and "linear #5" in text
        assert "│     5 │" in text  # trial numbers in their column
    assert "3 of 7 completed trials" in text and "9 total, 7 complete, 1 failed, 1 running" in text


def test_test_values_shown_side_by_side() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["a", "b"])
    add(study, [1.0, 0.0], test_values={"a": 0.75, "b": 0.25})
    add(study, [0.0, 1.0])
    rows = list(csv.reader(io.StringIO(front_to_csv(load_front(study)))))
    assert rows[0] == ["trial", "a", "b", "a (test)", "b (test)", "plan"]
    assert rows[1][3:5] == ["0.75", "0.25"] and rows[2][3:5] == ["", ""]


def test_origin_of_recipes_and_refinements_is_shown() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_metric_names(["a", "b"])
    add(study, [1.0, 0.0], initial=True, summary="linear #0")
    add(study, [0.0, 1.0], refine_of=7, summary="linear #1")
    add(study, [0.5, 0.5], summary="linear #2")
    front = load_front(study)
    assert [t.origin for t in front.trials] == ["recipe", "", "refines #7"]  # sorted by a, best first
    assert [e.get("origin") for e in front_to_json(front)["front"]] == ["recipe", None, "refines #7"]
    assert [r[-1] for r in csv.reader(io.StringIO(front_to_csv(front)))][1:] == [
        "linear #0 (recipe)", "linear #2", "linear #1 (refines #7)"]


def test_unnamed_objectives_and_from_values() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    add(study, [1.0, 2.0])
    assert load_front(study).names == ["obj0", "obj1"]
    front = Front.from_values(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 3.0]]), [("x", "minimize"), ("y", "minimize")],
                              reference_point={"x": 4.0, "y": 4.0})
    assert [t.number for t in front.trials] == [0, 1]
    assert front.hypervolume == pytest.approx(3.0 + 2.0)


def test_load_front_from_sqlite_url(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    study = optuna.create_study(storage=url, study_name="alpha", directions=["maximize", "minimize"])
    study.set_metric_names(["acc", "size"])
    for v in [(0.9, 5.0), (0.8, 3.0), (0.7, 4.0)]:
        add(study, list(v))
    optuna.create_study(storage=url, study_name="beta", directions=["maximize", "minimize"])
    front = load_front(url, "alpha")
    assert [t.number for t in front.trials] == [0, 1] and front.study_name == "alpha"
    with pytest.raises(StudyError, match=r"study 'gamma' not found .*available: alpha, beta$"):
        load_front(url, "gamma")
    with pytest.raises(StudyError, match="holds 2 studies, name one; available: alpha, beta"):
        load_front(url)
    with pytest.raises(StudyError, match="'beta' has no completed trials"):
        load_front(url, "beta")
    missing = tmp_path / "typo.db"
    with pytest.raises(StudyError, match="storage file not found"):
        load_front(f"sqlite:///{missing}", "alpha")
    assert not missing.exists()


def test_load_front_from_journal_file(tmp_path) -> None:
    from optuna.storages.journal import JournalFileBackend

    path = tmp_path / "runs.log"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=storage, study_name="j", directions=["minimize", "minimize"])
    study.set_user_attr("objective_names", ["loss", "size"])  # as mergesearch.search.study stores them
    for v in [(1.0, 2.0), (2.0, 1.0), (3.0, 3.0)]:
        add(study, list(v))
    for url in (str(path), f"journal://{path}"):
        front = load_front(url)  # a single study needs no name
        assert front.names == ["loss", "size"] and [t.number for t in front.trials] == [0, 1]
    with pytest.raises(StudyError, match="storage file not found"):
        load_front(str(tmp_path / "other.log"))


def test_study_without_completed_trials() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    add(study, None, state=TS.FAIL)
    with pytest.raises(StudyError, match=r"no completed trials .*1 failed"):
        load_front(study)
    with pytest.raises(StudyError, match="no completed trials"):
        study_hypervolume(study)
    assert hypervolume_history(study) == []
