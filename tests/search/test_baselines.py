"""Reference rows (base, each expert, uniform average) and the stored hypervolume reference point: scored once
per study, shown by `front` (table, JSON, CSV) marked as references, never picked, and the same reference
point and hypervolume in the run's progress line and in every later `front`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from mergesearch.search.baselines import derive_reference
from tests.support.cli import run_cli as _cli


def test_reference_is_the_base_and_for_costs_the_worst_expert() -> None:
    rows = [{"name": "base", "values": {"acc": 0.2, "l1": 0.0, "size": 10.0}},
            {"name": "expert a", "values": {"acc": 0.9, "l1": 5.0, "size": 10.0}},
            {"name": "expert b", "values": {"acc": 0.5, "l1": 7.0, "size": 10.0}},
            {"name": "uniform average", "values": {"acc": 0.6, "l1": 3.0, "size": 10.0}}]
    objectives = [("acc", "maximize"), ("l1", "minimize"), ("size", "minimize")]
    ref = derive_reference(rows, objectives, costs={"l1", "size"})
    assert ref["point"]["acc"] == 0.2 and ref["point"]["l1"] == 7.0
    assert ref["point"]["size"] == pytest.approx(11.0)  # flat: moved 10 % to the worse side, or no volume at all
    assert ref["ideal"] == {"acc": 0.9, "l1": 0.0, "size": 10.0}
    assert derive_reference([r for r in rows if r["name"] != "base"], objectives, set()) is None


def test_rows_scored_once_stored_point_reused_and_progress_agrees(tiny_job: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "s.db"
    args = ["run", str(tiny_job), "--storage", str(db), "--study", "s"]
    code, _, err = _cli([*args, "--trials", "3"], capsys)  # captured stderr is no terminal: plain lines
    assert code == 0, err
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    rows = study.user_attrs["baselines"]
    assert [r["name"] for r in rows] == ["base", "expert a", "expert b", "uniform average"]
    assert rows[0]["values"]["l1"] == 0.0  # the base is the base
    stored = study.user_attrs["hv_reference"]
    assert stored["source"] == "baselines"
    assert stored["point"]["sort_ll"] == rows[0]["values"]["sort_ll"]
    assert stored["point"]["l1"] == max(rows[1]["values"]["l1"], rows[2]["values"]["l1"])
    assert len(study.trials) == 3  # reference rows are not trials

    # the last progress line's hypervolume is the one front prints
    last = [line for line in err.splitlines() if line.startswith("[s] ")][-1]
    assert last.startswith("[s] 3/3 done") and "best: reverse=" in last and "l1=" in last
    code, out, _ = _cli(["front", "--storage", str(db), "--study", "s", "--format", "json"], capsys)
    data = json.loads(out)
    assert data["reference_point"] == stored["point"] and data["reference_source"] == "baselines"
    raw = float(re.search(r"\(raw ([0-9.e+-]+)\)", last).group(1))
    assert raw == pytest.approx(data["hypervolume"], rel=1e-3)
    assert 0.0 <= data["normalised_hypervolume"] <= 1.0
    refs = {r["name"]: r for r in data["references"]}
    assert set(refs) == {"base", "expert a", "expert b", "uniform average"}
    assert all(r["reference"] for r in refs.values())
    assert {p["trial"] for p in data["front"]} <= {t.number for t in study.trials}

    # a resumed run neither re-scores the rows nor moves the point: every later front measures the same way
    before_rows = study.user_attrs["baselines"]
    code, _, err = _cli([*args, "--trials", "5", "--no-progress"], capsys)
    assert code == 0, err
    assert "reference row scored" not in err
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert study.user_attrs["baselines"] == before_rows and study.user_attrs["hv_reference"] == stored
    code, out, _ = _cli(["front", "--storage", str(db), "--study", "s", "--format", "json"], capsys)
    assert json.loads(out)["reference_point"] == stored["point"]


def test_table_csv_show_reference_rows_and_pick_never_returns_one(tiny_job: Path, tmp_path: Path, capsys) -> None:
    db = tmp_path / "s.db"
    assert _cli(["run", str(tiny_job), "--storage", str(db), "--study", "s", "--trials", "3", "--no-progress"],
                capsys)[0] == 0
    code, out, _ = _cli(["front", "--storage", str(db), "--study", "s"], capsys)
    assert code == 0
    for name in ("base", "expert a", "expert b", "uniform average"):
        assert f"reference: {name}" in out
    assert "normalised" in out and "raw" in out and "the base's scores" in out
    code, out, _ = _cli(["front", "--storage", str(db), "--study", "s", "--format", "csv"], capsys)
    assert sum(line.startswith("ref,") for line in out.splitlines()) == 4
    code, out, _ = _cli(["pick", "--storage", str(db), "--study", "s", "--prefer", "l1=1", "--method", "asf"], capsys)
    assert code == 0 and "reference" not in out  # the base (l1 = 0) would win if it were a candidate


def test_config_reference_point_overrides_and_is_stored(tiny_job: Path, tmp_path: Path, capsys) -> None:
    tiny_job.write_text(tiny_job.read_text().replace(
        "seed: 0}", "seed: 0, baselines: false, reference_point: {reverse: -1, sort_ll: -50, l1: 1000}}"))
    db = tmp_path / "s.db"
    assert _cli(["run", str(tiny_job), "--storage", str(db), "--study", "s", "--trials", "2", "--no-progress"],
                capsys)[0] == 0
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{db}")
    assert "baselines" not in study.user_attrs
    assert study.user_attrs["hv_reference"]["point"] == {"reverse": -1.0, "sort_ll": -50.0, "l1": 1000.0}
    code, out, _ = _cli(["front", "--storage", str(db), "--study", "s", "--format", "json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["reference_point"] == {"reverse": -1.0, "sort_ll": -50.0, "l1": 1000.0}
    assert data["reference_source"] == "config" and data["references"] == []
