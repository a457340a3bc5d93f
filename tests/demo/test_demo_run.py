"""`mergesearch demo` end to end (fast variant, in-process workers): its front strictly dominates the uniform
average and both hand-tuned recipes it starts from, its summary says so, and it writes a PNG of the front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.demo.conftest import FAST_SEED
from tests.support.cli import run_cli


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    code, out, _ = run_cli(argv, capsys)
    return code, out


@pytest.mark.slow
def test_demo_front_dominates_the_uniform_average_and_the_recipes(fast_demo, tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    shutil.copytree(fast_demo.root, out)  # the build is reused (same seed and variant): only the search runs
    code, text = _cli(["demo", "--out", str(out), "--fast", "--seed", str(FAST_SEED), "--executor", "local",
                       "--workers", "1", "--trials", "40"], capsys)
    assert code == 0
    assert "strictly dominate every hand-tuned recipe it started from" in text
    assert (out / "front.png").read_bytes()[:4] == b"\x89PNG"
    code, text = _cli(["front", "--storage", str(out / "demo.db"), "--study", "demo", "--format", "json"], capsys)
    data = json.loads(text)
    uniform = next(r for r in data["references"] if r["name"] == "uniform average")
    assert uniform["dominated_by"], "no front trial strictly dominates the uniform average"
    names = [o["name"] for o in data["objectives"]]
    signs = [1 if o["direction"] == "maximize" else -1 for o in data["objectives"]]
    for number in uniform["dominated_by"]:  # check the claim independently of Front.dominating
        point = next(p for p in data["front"] if p["trial"] == number)["values"]
        diffs = [s * (point[n] - uniform["values"][n]) for n, s in zip(names, signs, strict=True)]
        assert min(diffs) >= 0 and max(diffs) > 0
