"""Plots label what they show: HTML hovers name trial, method and recipe; reference rows are drawn and named;
the knee is annotated; `front --plot-history` draws the (normalised) hypervolume over trials."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import optuna

from mergesearch.cli import main
from mergesearch.search.baselines import BASELINES_ATTR, REFERENCE_ATTR
from mergesearch.search.pareto import load_front
from mergesearch.search.plots import REFERENCE_COLOR, plot_front
from tests.search.test_plots import pixels_of


def _study(m: int = 2) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "maximize"][:m])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["acc", "l1", "b"][:m])
    rng = np.random.default_rng(0)
    for i in range(12):
        t = study.ask()
        t.set_user_attr("summary", f"{'ties' if i % 2 else 'task_arithmetic'} w=[.{i},.5]")
        study.tell(t, list(rng.random(m)))
    rows = [{"name": "base", "values": dict(zip(["acc", "l1", "b"], [0.0, 0.0, 0.0], strict=False))},
            {"name": "expert x", "values": dict(zip(["acc", "l1", "b"], [0.6, 0.9, 0.6], strict=False))}]
    study.set_user_attr(BASELINES_ATTR, rows)
    names = ["acc", "l1", "b"][:m]
    study.set_user_attr(REFERENCE_ATTR, {"point": {n: 0.0 if n != "l1" else 0.9 for n in names},
                                         "ideal": {n: 0.6 if n != "l1" else 0.0 for n in names},
                                         "source": "baselines"})
    return study


def test_html_hover_names_every_trial_method_and_recipe(tmp_path: Path) -> None:
    front = load_front(_study())
    out = plot_front(front, None, tmp_path / "f.html", picked=(front.trials[0].number, "knee"))
    html = out.read_text().replace("\\u003c", "<").replace("\\u003e", ">")  # plotly escapes them in its JSON
    for number in range(12):  # every trial, not only the front
        assert f"trial {number}<br>" in html
    assert "ties w=[.3,.5]" in html and "task_arithmetic<br>" in html
    assert "expert x" in html and "reference models" in html and "<b>knee<" in html


def test_png_draws_reference_rows(tmp_path: Path) -> None:
    front = load_front(_study())
    with_refs = plot_front(front, None, tmp_path / "a.png", picked=(front.trials[0].number, "knee"))
    front.references.clear()
    without = plot_front(front, None, tmp_path / "b.png")
    assert pixels_of(with_refs, REFERENCE_COLOR, tol=0.1) > pixels_of(without, REFERENCE_COLOR, tol=0.1) + 50


def test_front_plot_history_cli(tiny_job: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    for argv in (["run", str(tiny_job), "--storage", str(db), "--study", "s", "--trials", "3", "--no-progress"],
                 ["front", "--storage", str(db), "--study", "s", "--plot-history", str(tmp_path / "h.png"),
                  "--plot", str(tmp_path / "f.png")]):
        try:
            main(argv)
        except SystemExit as e:
            assert not e.code
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.png").stat().st_size > 0
