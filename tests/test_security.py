"""Security: no code runs from pickles or YAML, remote code only on request, no secrets or home paths leak."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergesearch.errors import ModelError
from mergesearch.models import Checkpoint
from mergesearch.search.study import mask_url
from tests.test_bad_inputs import cli


class _Evil:
    """Unpickling this creates a marker file: proof that the pickle ran code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled_model(root: Path, src: Path, *, evil_marker: Path | None = None) -> Path:
    d = root / ("evil" if evil_marker else "pickled")
    d.mkdir()
    shutil.copy(src / "config.json", d / "config.json")
    state: dict = dict(load_file(src / "model.safetensors"))
    if evil_marker is not None:
        _Evil.marker = str(evil_marker)
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump({"model.embed_tokens.weight": _Evil()}, f)
    else:
        torch.save(state, d / "pytorch_model.bin")
    return d


def test_pickle_refused_without_flag_and_loaded_weights_only_with_it(tiny_models, tmp_path) -> None:
    d = _pickled_model(tmp_path, tiny_models["a"])
    with pytest.raises(ModelError, match="--allow-pickle"):
        Checkpoint(str(d))
    ck = Checkpoint(str(d), allow_pickle=True)
    expected = load_file(tiny_models["a"] / "model.safetensors")["model.norm.weight"]
    assert torch.equal(ck.get("model.norm.weight"), expected)


def test_malicious_pickle_never_executes_even_when_allowed(tiny_models, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    d = _pickled_model(tmp_path, tiny_models["a"], evil_marker=marker)
    with pytest.raises(ModelError, match=r"pytorch_model\.bin"):
        Checkpoint(str(d), allow_pickle=True)
    assert not marker.exists()
    # through the CLI: a mergekit config naming it, with --allow-pickle
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_models["base"]),
                                   "models": [{"model": str(d), "parameters": {"weight": 1.0}}]}))
    code, err = cli(["merge", str(cfg), str(tmp_path / "out"), "--allow-pickle"], capsys)
    assert code != 0 and len(err) == 1 and "evil" in err[0], err
    assert not marker.exists()
    code, err = cli(["merge", str(cfg), str(tmp_path / "out")], capsys)
    assert code != 0 and "--allow-pickle" in err[0]


def test_yaml_tags_never_execute(tmp_path, capsys) -> None:
    marker = tmp_path / "yaml-pwned"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"base_model: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                   f"['{marker}']]\n")
    code, err = cli(["run", str(cfg)], capsys)
    assert code == 2 and len(err) == 1 and "job.yaml" in err[0]
    assert not marker.exists()


def _remote_code_model(root: Path, base: Path, marker: Path) -> Path:
    d = root / "remote"
    shutil.copytree(base, d)
    # it stops right after leaving its mark (defining real classes would register them process-wide)
    (d / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                               "raise RuntimeError('custom code ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_remote_code_runs_only_when_the_config_asks(tiny_models, tmp_path, capsys) -> None:
    from tests.conftest import write_job

    marker = tmp_path / "remote-ran"
    models = {**tiny_models, "base": _remote_code_model(tmp_path, tiny_models["base"], marker)}
    job = write_job(tmp_path / "j", models, objectives="  - {type: l1_from_base, name: l1}\n")
    run = ["run", str(job), "--trials", "1", "--no-progress"]
    code, err = cli([*run, "--storage", f"sqlite:///{tmp_path / 'a.db'}", "--study", "a"], capsys)
    assert code == 0, err
    assert not marker.exists()  # the model's own custom code was ignored: the built-in Llama class was used
    job.write_text(job.read_text() + "trust_remote_code: true\n")
    code, err = cli([*run, "--storage", f"sqlite:///{tmp_path / 'b.db'}", "--study", "b"], capsys)
    assert marker.exists()  # the explicit key is what enables it
    assert code != 0 and len(err) == 1 and "custom code ran" in err[0], err


def test_passwords_masked_in_messages(capsys) -> None:
    assert mask_url("postgresql://user:secret@db.example:5432/x") == "postgresql://user:***@db.example:5432/x"
    assert mask_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    for argv in (["front", "--storage", "postgresql://user:secret@127.0.0.1:1/db", "--study", "s"],
                 ["pick", "--storage", "mysql+pymysql://root:secret@127.0.0.1:1/db", "--study", "s"]):
        code, err = cli(argv, capsys)
        assert code != 0 and len(err) == 1 and "secret" not in err[0] and "***" in err[0], err


def test_exported_recipe_has_no_absolute_paths_unless_asked(tiny_job, tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    code, err = cli(["run", str(tiny_job), "--storage", url, "--study", "r", "--trials", "1", "--no-progress"], capsys)
    assert code == 0, err
    home = str(Path(tiny_job).parents[1])  # the machine's folders above the job and the models
    out = tmp_path / "export" / "model"
    code, err = cli(["pick", "--storage", url, "--study", "r", "--out", str(out)], capsys)
    assert code == 0, err
    for name in ("recipe.yaml", "mergekit_config.yml", "scores.json"):
        if (out / name).exists():
            text = (out / name).read_text()
            assert home not in text and "/tmp/" not in text, (name, text)
    out_abs = tmp_path / "export" / "abs"
    assert cli(["pick", "--storage", url, "--study", "r", "--out", str(out_abs), "--absolute-paths"], capsys)[0] == 0
    assert home in (out_abs / "recipe.yaml").read_text()


def test_ray_dashboard_never_public(monkeypatch) -> None:
    """The local Ray instance is started without a dashboard (or bound to localhost), never on 0.0.0.0."""
    import ray

    from mergesearch.execution import ray_pool

    seen: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    ray_pool._connect(None, 1)
    assert seen, "ray.init not called"
    kw = seen[0]
    assert kw.get("include_dashboard") is False or kw.get("dashboard_host") in ("127.0.0.1", "localhost")
    assert "0.0.0.0" not in json.dumps(kw, default=str)
