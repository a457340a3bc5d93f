"""Front and hypervolume plots are written, valid, and actually show the points (PNG pixels, HTML traces)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mergesearch.errors import ConfigError
from mergesearch.search.pareto import Front
from mergesearch.search.plots import FRONT_COLOR, plot_front, plot_hypervolume_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_front(m: int, n: int = 50) -> Front:
    rng = np.random.default_rng(m)
    directions = ["maximize", "minimize", "maximize", "minimize"][:m]
    return Front.from_values(rng.random((n, m)), [(f"obj{j}", d) for j, d in enumerate(directions)])


def pixels_of(path: Path, hex_color: str, tol: float = 0.06) -> int:
    """How many pixels of the PNG are close to ``hex_color``."""
    import matplotlib.image as mpimg
    from matplotlib.colors import to_rgb

    img = mpimg.imread(path)[..., :3]
    return int((np.abs(img - np.array(to_rgb(hex_color))).max(axis=-1) < tol).sum())


def bluish_grey_pixels(path: Path) -> int:
    """Pixels of the other trials' colour (blue above red, as in OTHER_COLOR), even blended with white by alpha;
    text, grid lines (neutral grey) and the front (red) do not count."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return int(((img[..., 2] - img[..., 0] > 0.02) & (img[..., 0] < 0.97)).sum())


@pytest.mark.parametrize("m", [2, 3, 4])
def test_png_shows_trials_and_front(tmp_path: Path, m: int) -> None:
    front = make_front(m)
    out = plot_front(front, None, tmp_path / "sub" / "front.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert pixels_of(out, FRONT_COLOR) > 300  # the front is drawn, highlighted
    assert bluish_grey_pixels(out) > 1000  # and so are the other trials
    assert [p.name for p in out.parent.iterdir()] == ["front.png"]  # no temporary file left behind


def test_png_without_points_has_no_front_pixels(tmp_path: Path) -> None:
    # the pixel check can fail: an empty front over the same trials has no red
    front = make_front(2)
    empty = Front(front.objectives, [], front.counts, 0.0, front.reference_point, front.all_values)
    out = plot_front(empty, None, tmp_path / "empty.png")
    assert pixels_of(out, FRONT_COLOR) < 150  # only the legend's marker
    assert bluish_grey_pixels(out) > 1000


@pytest.mark.parametrize(("m", "trace"), [(2, '"type":"scatter"'), (3, '"type":"parcoords"'),
                                          (4, '"type":"parcoords"')])
def test_html_has_the_traces(tmp_path: Path, m: int, trace: str) -> None:
    front = make_front(m)
    values = front.all_values
    out = plot_front(front, values, tmp_path / "front.html")
    text = out.read_text()
    assert "<html>" in text[:200] and len(text) > 1_000_000  # self-contained plotly.js
    assert trace in text and "Pareto front" in text
    if m == 3:
        assert '"type":"scatter3d"' in text


def test_hypervolume_history_plots(tmp_path: Path) -> None:
    histories = {"tpe": [0.1, 0.3, 0.5, 0.55], "random": [0.1, 0.2, 0.2, 0.4]}
    png = plot_hypervolume_history(histories, tmp_path / "hv.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    html = plot_hypervolume_history(histories, tmp_path / "hv.html").read_text()
    assert '"name":"tpe"' in html and '"name":"random"' in html


def test_bad_plot_requests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"must end in .png or .html: .*front.pdf"):
        plot_front(make_front(2), None, tmp_path / "front.pdf")
    with pytest.raises(ConfigError, match="no hypervolume history"):
        plot_hypervolume_history({}, tmp_path / "hv.png")
