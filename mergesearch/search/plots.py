"""Plots of a Pareto front and of hypervolume histories: PNG (matplotlib, Agg) or HTML (plotly, self-contained).

Two objectives: a scatter of every completed trial with the front highlighted and joined by its staircase.
Three or more: parallel coordinates (each axis scaled to the objective's range over all trials, the better end
at the top), plus a 3-D scatter beside it when there are exactly three. Files are written to a temporary name in
the same directory and renamed, so a reader never sees a half-written plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mergesearch.errors import ConfigError
from mergesearch.search.pareto import Front

FRONT_COLOR, OTHER_COLOR = "#d62728", "#9aa4b1"


def _format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "html"):
        raise ConfigError(f"plot file must end in .png or .html: {path}")
    return fmt


def _write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; the parent directory is created if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _label(name: str, direction: str) -> str:
    return f"{name} ({'↑ higher' if direction == 'maximize' else '↓ lower'} is better)"


def _title(front: Front) -> str:
    study = f"study {front.study_name}\n" if front.study_name else ""
    return (f"{study}Pareto front: {len(front.trials)} of {front.counts.get('complete', 0)} completed trials, "
            f"hypervolume {front.hypervolume:.4g}")


def _scaled(values: np.ndarray, all_values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Values scaled to [0, 1] per objective over ``all_values``, 1 = best (for parallel coordinates)."""
    lo, hi = all_values.min(axis=0), all_values.max(axis=0)
    x = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.where([d == "minimize" for d in directions], 1.0 - x, x)


def plot_front(front: Front, all_trials_values: np.ndarray | None, path: str | Path) -> Path:
    """Write a plot of ``front`` over all completed trials to ``path`` (``.png`` or ``.html``).

    Args:
        front: the front (its trials are highlighted).
        all_trials_values: ``(n, m)`` values of every completed trial, user units; None → ``front.all_values``.
        path: output file; its extension chooses the backend.

    Returns:
        The written path.
    """
    path = Path(path)
    fmt = _format(path)
    values = front.all_values if all_trials_values is None else np.asarray(all_trials_values, dtype=float)
    values = values.reshape(-1, len(front.objectives))
    pf = front.values()
    if len(values) == 0:
        values = pf
    if len(front.objectives) < 2:
        raise ConfigError("plotting a front needs at least 2 objectives")
    draw = _front_png if fmt == "png" else _front_html
    return _write_atomic(path, lambda tmp: draw(front, values, pf, tmp))


def _front_png(front: Front, values: np.ndarray, pf: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, dirs, m = front.names, front.directions, len(front.objectives)
    if m == 2:
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        ax.scatter(values[:, 0], values[:, 1], s=18, c=OTHER_COLOR, alpha=0.7, label=f"trials ({len(values)})")
        order = np.argsort(pf[:, 0])
        # the boundary of the dominated region: with x maximised each point's y holds to its left ("pre")
        where = "pre" if dirs[0] == "maximize" else "post"
        ax.step(pf[order, 0], pf[order, 1], where=where, c=FRONT_COLOR, lw=1.2, alpha=0.8)
        ax.scatter(pf[:, 0], pf[:, 1], s=46, c=FRONT_COLOR, edgecolors="black", linewidths=0.6, zorder=3,
                   label=f"Pareto front ({len(pf)})")
        for t, (x, y) in zip(front.trials[:40], pf[:40], strict=True):  # beyond ~40 labels are unreadable
            ax.annotate(f"#{t.number}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(_label(names[0], dirs[0]))
        ax.set_ylabel(_label(names[1], dirs[1]))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    else:
        fig = plt.figure(figsize=(13 if m == 3 else 8, 5.5))
        ax = fig.add_subplot(1, 2 if m == 3 else 1, 1)
        xs = np.arange(m)
        for row in _scaled(values, values, dirs):
            ax.plot(xs, row, c=OTHER_COLOR, alpha=0.5, lw=0.8)
        for i, row in enumerate(_scaled(pf, values, dirs)):
            ax.plot(xs, row, c=FRONT_COLOR, lw=1.8, marker="o", label="Pareto front" if i == 0 else None)
        ax.plot([], [], c=OTHER_COLOR, label="other trials")
        lo, hi = values.min(axis=0), values.max(axis=0)
        ax.set_xticks(xs, [f"{n}\n{'↑' if d == 'maximize' else '↓'} [{a:.3g}, {b:.3g}]"
                           for n, d, a, b in zip(names, dirs, lo, hi, strict=True)])
        ax.set_ylabel("scaled value (1 = best over all trials)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(axis="x", alpha=0.5)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        if m == 3:
            ax3 = fig.add_subplot(1, 2, 2, projection="3d")
            ax3.scatter(*values.T, s=10, c=OTHER_COLOR, alpha=0.5, label="trials")
            ax3.scatter(*pf.T, s=36, c=FRONT_COLOR, edgecolors="black", linewidths=0.5, label="Pareto front")
            ax3.set_xlabel(_label(names[0], dirs[0]), fontsize=8)
            ax3.set_ylabel(_label(names[1], dirs[1]), fontsize=8)
            ax3.set_zlabel(_label(names[2], dirs[2]), fontsize=8)
            ax3.legend(loc="upper left")
    fig.suptitle(_title(front), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)


def _front_html(front: Front, values: np.ndarray, pf: np.ndarray, out: Path) -> None:
    import plotly.graph_objects as go

    names, dirs, m = front.names, front.directions, len(front.objectives)
    hover = [f"trial {t.number}<br>{t.summary}" for t in front.trials]
    if m == 2:
        order = np.argsort(pf[:, 0])
        fig = go.Figure([
            go.Scatter(x=values[:, 0], y=values[:, 1], mode="markers", name=f"trials ({len(values)})",
                       marker={"color": OTHER_COLOR, "size": 7}),
            go.Scatter(x=pf[order, 0], y=pf[order, 1], mode="lines+markers", name=f"Pareto front ({len(pf)})",
                       line={"shape": "vh" if dirs[0] == "maximize" else "hv", "color": FRONT_COLOR},
                       marker={"color": FRONT_COLOR, "size": 10, "line": {"width": 1, "color": "black"}},
                       text=[hover[i] for i in order], hoverinfo="x+y+text"),
        ])
        fig.update_layout(xaxis_title=_label(names[0], dirs[0]), yaxis_title=_label(names[1], dirs[1]))
    else:
        both = np.vstack([values, pf])
        on_front = np.r_[np.zeros(len(values)), np.ones(len(pf))]
        dims: list[dict[str, Any]] = []
        for j, (n, d) in enumerate(front.objectives):
            lo, hi = float(both[:, j].min()), float(both[:, j].max())
            dims.append({"label": f"{n} {'↑' if d == 'maximize' else '↓'}", "values": both[:, j],
                         "range": [lo, hi] if d == "maximize" else [hi, lo]})  # better end at the top
        fig = go.Figure(go.Parcoords(
            line={"color": on_front, "colorscale": [[0, OTHER_COLOR], [1, FRONT_COLOR]], "cmin": 0, "cmax": 1},
            dimensions=dims))
        if m == 3:
            from plotly.subplots import make_subplots

            par = fig.data[0]
            fig = make_subplots(rows=1, cols=2, specs=[[{"type": "domain"}, {"type": "scene"}]],
                                subplot_titles=("parallel coordinates (red: Pareto front)", "3-D"))
            fig.add_trace(par, row=1, col=1)
            fig.add_trace(go.Scatter3d(x=values[:, 0], y=values[:, 1], z=values[:, 2], mode="markers",
                                       name="trials", marker={"color": OTHER_COLOR, "size": 3}), row=1, col=2)
            fig.add_trace(go.Scatter3d(x=pf[:, 0], y=pf[:, 1], z=pf[:, 2], mode="markers", name="Pareto front",
                                       text=hover, marker={"color": FRONT_COLOR, "size": 5}), row=1, col=2)
            fig.update_scenes(xaxis_title=names[0], yaxis_title=names[1], zaxis_title=names[2])
    fig.update_layout(title=_title(front).replace("\n", "<br>"), template="plotly_white")
    fig.write_html(out, include_plotlyjs=True, full_html=True)


def plot_hypervolume_history(histories: Mapping[str, Sequence[float]], path: str | Path,
                             title: str = "Hypervolume vs completed trials") -> Path:
    """Write one hypervolume curve per label (x = completed trials) to ``path`` (``.png`` or ``.html``)."""
    path = Path(path)
    fmt = _format(path)
    if not histories or not any(len(h) for h in histories.values()):
        raise ConfigError("no hypervolume history to plot")

    def png(out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 5))
        for label, h in histories.items():
            ax.plot(np.arange(1, len(h) + 1), h, lw=1.6, label=label)
        ax.set_xlabel("completed trials")
        ax.set_ylabel("hypervolume")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=110)
        plt.close(fig)

    def html(out: Path) -> None:
        import plotly.graph_objects as go

        fig = go.Figure([go.Scatter(x=np.arange(1, len(h) + 1), y=list(h), mode="lines", name=label)
                         for label, h in histories.items()])
        fig.update_layout(title=title, xaxis_title="completed trials", yaxis_title="hypervolume",
                          template="plotly_white")
        fig.write_html(out, include_plotlyjs=True, full_html=True)

    return _write_atomic(path, png if fmt == "png" else html)
