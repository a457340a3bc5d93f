"""Model paths resolve as data paths do: against the config's folder, never the working directory; a value is a
hub id only when no local folder matches; errors say where they looked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mergesearch.cli import main
from mergesearch.config import load_config
from mergesearch.errors import ConfigError, ModelError
from mergesearch.models import resolve_model
from tests.conftest import write_job


def _job(root: Path, base: str, models: list[str]) -> Path:
    path = root / "job.yaml"
    path.write_text(f"base_model: {base}\nmodels: [{', '.join(models)}]\n"
                    "objectives: [{type: l1_from_base, name: l1}]\n")
    return path


def test_relative_models_resolve_against_the_config_folder(tiny_models, tmp_path: Path, monkeypatch) -> None:
    cfg = tmp_path / "cfg"
    shutil.copytree(tiny_models["base"], cfg / "experts" / "base")
    shutil.copytree(tiny_models["a"], cfg / "experts" / "a")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = load_config(_job(cfg, "experts/base", ["./experts/a", "org/hub-model"]))
    assert config.base_model == str(cfg / "experts" / "base")
    assert config.models == [str(cfg / "experts" / "a"), "org/hub-model"]  # no folder matches: a hub id


def test_model_only_relative_to_the_working_directory_is_refused_naming_both(tiny_models, tmp_path: Path,
                                                                            monkeypatch, capsys) -> None:
    cfg, cwd = tmp_path / "cfg", tmp_path / "cwd"
    cfg.mkdir()
    shutil.copytree(tiny_models["a"], cwd / "experts" / "a")
    job = write_job(cfg, tiny_models)
    job.write_text(job.read_text().replace(f"models: [{tiny_models['a']}", "models: [experts/a"))
    monkeypatch.chdir(cwd)
    with pytest.raises(ConfigError) as e:
        load_config(job)
    msg = str(e.value)
    assert str(cfg / "experts" / "a") in msg and str(cwd / "experts" / "a") in msg and "models[0]" in msg
    capsys.readouterr()
    with pytest.raises(SystemExit) as code:
        main(["run", str(job), "--storage", str(tmp_path / "s.db"), "--no-progress"])
    assert code.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and str(cfg / "experts" / "a") in err and str(cwd / "experts" / "a") in err
    assert not (tmp_path / "s.db").exists()


def test_missing_local_model_names_the_config_folder(tiny_models, tmp_path: Path, monkeypatch) -> None:
    config = load_config(_job(tmp_path, str(tiny_models["base"]), ["./gone"]))
    assert config.models == [str(tmp_path / "gone")]
    with pytest.raises(ModelError, match=str(tmp_path / "gone")):
        resolve_model(config.models[0])


def test_hub_failure_is_one_line_naming_model_place_and_reply(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as e:
        resolve_model("not-a-user/not-a-model")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'not-a-user/not-a-model'" in msg and str(tmp_path / "not-a-user" / "not-a-model") in msg
    assert "hub refused it:" in msg and "Error" in msg  # the host's (here: offline mode's) reply, with its type


def test_relative_storage_refused_under_ray_job_submit(tiny_job: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    monkeypatch.chdir(tmp_path)
    for storage in ([], ["--storage", "runs.db"], ["--storage", "sqlite:///runs.db"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as code:
            main(["run", str(tiny_job), "--no-progress", *storage])
        assert code.value.code == 2
        err = capsys.readouterr().err
        assert "ray job submit" in err and "absolute" in err
    assert not list(tmp_path.glob("*.db"))
    capsys.readouterr()
    main(["run", str(tiny_job), "--no-progress", "--trials", "1", "--storage", f"sqlite:///{tmp_path / 'abs.db'}"])
    assert f"in sqlite:///{tmp_path / 'abs.db'}" in capsys.readouterr().err  # every run says where its study is
