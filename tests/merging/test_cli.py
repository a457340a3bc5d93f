"""Bad input through `mergesearch merge`: one line naming the culprit, non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["merge", *argv])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def cfg(tmp_path: Path, plan: dict | str) -> str:
    p = tmp_path / "cfg.yml"
    p.write_text(plan if isinstance(plan, str) else yaml.safe_dump(plan))
    return str(p)


def ties(m: dict[str, Path], **over) -> dict:
    plan = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "float32",
            "models": [{"model": str(m["a"]), "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": str(m["b"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    plan.update(over)
    return plan


def mismatched(tmp_path: Path, models: dict[str, Path]) -> dict:
    d = tmp_path / "other"
    shutil.copytree(models["a"], d)
    cfg_ = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg_, "model_type": "gpt2"}))
    return ties(models, models=[{"model": str(d), "parameters": {"weight": 1.0}}])


CASES = {
    "missing model dir": (lambda tp, m: ties(m, base_model="/no/such/dir"), "/no/such/dir"),
    "mismatched architectures": (mismatched, "model_type 'gpt2'"),
    "unknown method": (lambda tp, m: ties(m, merge_method="tie"), "unknown merge_method 'tie'"),
    "density outside [0, 1]": (lambda tp, m: ties(m, models=[{"model": str(m["a"]), "parameters":
                                                              {"weight": 1.0, "density": 1.5}}]), "'density'"),
    "slice beyond layers": (lambda tp, m: {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(m["a"]), "layer_range": [0, 5]}]}]}, "slice 0: layer_range [0, 5]"),
    "malformed yaml": (lambda tp, m: "merge_method: ties\nmodels: [\n", "malformed YAML"),
    # finite in float32, out of float16's range: was written as inf
    "out_dtype overflow": (lambda tp, m: ties(m, merge_method="task_arithmetic", out_dtype="float16", models=[
        {"model": str(m["a"]), "parameters": {"weight": 1e7}}]), "overflows out_dtype float16"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line(tmp_path, capsys, tiny_models, case):
    make, expected = CASES[case]
    code, _, err = run_cli(capsys, cfg(tmp_path, make(tmp_path, tiny_models)), str(tmp_path / "out"))
    assert code != 0
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_merge_ok(tmp_path, capsys, tiny_models):
    main(["merge", cfg(tmp_path, ties(tiny_models)), str(tmp_path / "out")])
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()
