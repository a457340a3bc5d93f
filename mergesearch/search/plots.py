"""Plots of a Pareto front and of hypervolume histories: PNG (matplotlib, Agg) or HTML (plotly, self-contained).

Two objectives: a scatter of every completed trial (coloured by merge method when the study stored plan
summaries) with the front highlighted and joined by its staircase, the reference rows (base, each expert,
uniform average) as labelled black stars, and the picked (or knee) trial annotated. Three or more: parallel
coordinates (each axis scaled to the objective's range over all trials, the better end at the top; reference
rows dashed black), plus a 3-D scatter beside it when there are exactly three. HTML hovers name each trial,
its method and its recipe summary. Files are written to a temporary name in
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

FRONT_COLOR, OTHER_COLOR, REFERENCE_COLOR = "#d62728", "#9aa4b1", "#111111"
#: colours of the other trials by merge method (no red: that is the front's)
METHOD_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#ff7f0e")


def _methods(front: Front, n: int) -> list[str]:
    """The merge method of each of the ``n`` plotted trials (the first word of its summary), or [] if unknown."""
    if len(front.all_info) != n:
        return []
    return [(summary.split() or ["?"])[0] for _, summary in front.all_info]


def _hover(front: Front, n: int) -> list[str]:
    if len(front.all_info) != n:
        return [""] * n
    return [f"trial {num}<br>{(summary.split() or ['?'])[0]}<br>{summary}" for num, summary in front.all_info]


def _references(front: Front) -> tuple[list[str], np.ndarray]:
    names = list(front.references)
    vals = np.array([[front.references[k][n] for n in front.names] for k in names], dtype=float)
    return names, vals.reshape(len(names), len(front.names))


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
    hv = (f"hypervolume {front.normalised_hypervolume:.3f} (raw {front.hypervolume:.4g})"
          if front.normalised_hypervolume is not None else f"hypervolume {front.hypervolume:.4g}")
    return f"{study}Pareto front: {len(front.trials)} of {front.counts.get('complete', 0)} completed trials, {hv}"


def _scaled(values: np.ndarray, all_values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Values scaled to [0, 1] per objective over ``all_values``, 1 = best (for parallel coordinates)."""
    lo, hi = all_values.min(axis=0), all_values.max(axis=0)
    x = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.where([d == "minimize" for d in directions], 1.0 - x, x)


def plot_front(front: Front, all_trials_values: np.ndarray | None, path: str | Path, *,
               picked: tuple[int, str] | None = None) -> Path:
    """Write a plot of ``front`` over all completed trials to ``path`` (``.png`` or ``.html``).

    Args:
        front: the front (its trials are highlighted; its reference rows are drawn as such).
        all_trials_values: ``(n, m)`` values of every completed trial, user units; None → ``front.all_values``.
        path: output file; its extension chooses the backend.
        picked: ``(trial number, label)`` of a front trial to annotate, e.g. ``(12, "knee")``.

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
    return _write_atomic(path, lambda tmp: draw(front, values, pf, tmp, picked))


def _front_png(front: Front, values: np.ndarray, pf: np.ndarray, out: Path,
               picked: tuple[int, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, dirs, m = front.names, front.directions, len(front.objectives)
    methods = _methods(front, len(values))
    ref_names, refs = _references(front)
    if m == 2:
        fig, ax = plt.subplots(figsize=(7.5, 5.5))
        if methods:
            for k, method in enumerate(dict.fromkeys(methods)):
                sel = np.array([x == method for x in methods])
                ax.scatter(values[sel, 0], values[sel, 1], s=18, c=METHOD_COLORS[k % len(METHOD_COLORS)],
                           alpha=0.7, label=f"{method} ({int(sel.sum())})")
        else:
            ax.scatter(values[:, 0], values[:, 1], s=18, c=OTHER_COLOR, alpha=0.7, label=f"trials ({len(values)})")
        if len(refs):
            ax.scatter(refs[:, 0], refs[:, 1], s=90, marker="*", c=REFERENCE_COLOR, zorder=4,
                       label="reference models")
            for name, (x, y) in zip(ref_names, refs, strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=7)
        if picked is not None:
            at = {t.number: i for i, t in enumerate(front.trials)}.get(picked[0])
            if at is not None:
                ax.annotate(f"{picked[1]} #{picked[0]}", pf[at], textcoords="offset points", xytext=(18, 18),
                            fontsize=8, fontweight="bold", arrowprops={"arrowstyle": "->", "lw": 1.0}, zorder=5)
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
        span = np.vstack([values, refs]) if len(refs) else values  # axes cover the reference rows too
        for row in _scaled(values, span, dirs):
            ax.plot(xs, row, c=OTHER_COLOR, alpha=0.5, lw=0.8)
        for i, row in enumerate(_scaled(pf, span, dirs)):
            ax.plot(xs, row, c=FRONT_COLOR, lw=1.8, marker="o", label="Pareto front" if i == 0 else None)
        for i, row in enumerate(_scaled(refs, span, dirs) if len(refs) else []):
            ax.plot(xs, row, c=REFERENCE_COLOR, lw=1.2, ls="--", label="reference models" if i == 0 else None)
            ax.annotate(ref_names[i], (xs[-1], row[-1]), textcoords="offset points", xytext=(4, 0), fontsize=7)
        at = {t.number: i for i, t in enumerate(front.trials)}.get(picked[0]) if picked is not None else None
        if at is not None:
            ax.plot(xs, _scaled(pf[at:at + 1], span, dirs)[0], c=FRONT_COLOR, lw=4.0, alpha=0.5,
                    label=f"{picked[1]} #{picked[0]}")
        ax.plot([], [], c=OTHER_COLOR, label="other trials")
        lo, hi = span.min(axis=0), span.max(axis=0)
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
            if len(refs):
                ax3.scatter(*refs.T, s=70, marker="*", c=REFERENCE_COLOR, label="reference models")
                for name, row in zip(ref_names, refs, strict=True):
                    ax3.text(*row, f" {name}", fontsize=7)
            ax3.set_xlabel(_label(names[0], dirs[0]), fontsize=8)
            ax3.set_ylabel(_label(names[1], dirs[1]), fontsize=8)
            ax3.set_zlabel(_label(names[2], dirs[2]), fontsize=8)
            ax3.legend(loc="upper left")
    fig.suptitle(_title(front), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=110)
    plt.close(fig)


def _front_html(front: Front, values: np.ndarray, pf: np.ndarray, out: Path,
                picked: tuple[int, str] | None = None) -> None:
    import plotly.graph_objects as go

    names, dirs, m = front.names, front.directions, len(front.objectives)
    hover = [f"trial {t.number}<br>{(t.summary.split() or ['?'])[0]}<br>{t.summary}"
             + (f" ({t.origin})" if t.origin else "") + (f"<br><b>{picked[1]}</b>" if picked and
                                                         picked[0] == t.number else "") for t in front.trials]
    all_hover = _hover(front, len(values))
    ref_names, refs = _references(front)
    if m == 2:
        order = np.argsort(pf[:, 0])
        traces = [
            go.Scatter(x=values[:, 0], y=values[:, 1], mode="markers", name=f"trials ({len(values)})",
                       marker={"color": OTHER_COLOR, "size": 7}, text=all_hover, hoverinfo="x+y+text"),
            go.Scatter(x=pf[order, 0], y=pf[order, 1], mode="lines+markers", name=f"Pareto front ({len(pf)})",
                       line={"shape": "vh" if dirs[0] == "maximize" else "hv", "color": FRONT_COLOR},
                       marker={"color": FRONT_COLOR, "size": 10, "line": {"width": 1, "color": "black"}},
                       text=[hover[i] for i in order], hoverinfo="x+y+text"),
        ]
        if len(refs):
            traces.append(go.Scatter(x=refs[:, 0], y=refs[:, 1], mode="markers+text", name="reference models",
                                     text=ref_names, textposition="bottom right", hoverinfo="x+y+text",
                                     marker={"color": REFERENCE_COLOR, "size": 13, "symbol": "star"}))
        fig = go.Figure(traces)
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
                                       name="trials", text=all_hover, hoverinfo="x+y+z+text",
                                       marker={"color": OTHER_COLOR, "size": 3}), row=1, col=2)
            fig.add_trace(go.Scatter3d(x=pf[:, 0], y=pf[:, 1], z=pf[:, 2], mode="markers", name="Pareto front",
                                       text=hover, marker={"color": FRONT_COLOR, "size": 5}), row=1, col=2)
            if len(refs):
                fig.add_trace(go.Scatter3d(x=refs[:, 0], y=refs[:, 1], z=refs[:, 2], mode="markers+text",
                                           name="reference models", text=ref_names,
                                           marker={"color": REFERENCE_COLOR, "size": 6, "symbol": "diamond"}),
                              row=1, col=2)
            fig.update_scenes(xaxis_title=names[0], yaxis_title=names[1], zaxis_title=names[2])
    fig.update_layout(title=_title(front).replace("\n", "<br>"), template="plotly_white")
    fig.write_html(out, include_plotlyjs=True, full_html=True)


def plot_hypervolume_history(histories: Mapping[str, Sequence[float]], path: str | Path,
                             title: str = "Hypervolume vs completed trials", ylabel: str = "hypervolume") -> Path:
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
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=110)
        plt.close(fig)

    def html(out: Path) -> None:
        import plotly.graph_objects as go

        fig = go.Figure([go.Scatter(x=np.arange(1, len(h) + 1), y=list(h), mode="lines", name=label)
                         for label, h in histories.items()])
        fig.update_layout(title=title.replace("\n", "<br>"), xaxis_title="completed trials", yaxis_title=ylabel,
                          template="plotly_white")
        fig.write_html(out, include_plotlyjs=True, full_html=True)

    return _write_atomic(path, png if fmt == "png" else html)
