"""A battery of bad inputs driven through the CLI: configs, models, data, storages and command lines.

Every case must end with a non-zero exit, exactly one ``error:`` line on stderr that names the culprit, no
traceback, and — where a stored study exists — the storage as it was: every study, trial, state, parameter,
value and attribute equal, and the file byte-for-byte unchanged unless the case lets the run take the driver
lease before it fails (then the lease is given back as it was, but SQLite's header counts the writes).
Most cases call ``mergesearch.cli.main`` in-process (fast); a few run ``python -m mergesearch.cli`` for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesearch.cli import main
from tests.conftest import make_tiny_llama, write_job

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    """The CLI silences transformers' progress bars by env var at start-up; in-process it is imported already."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run the CLI in-process; returns (exit code, non-empty stderr lines)."""
    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(path: Path) -> dict[str, Any]:
    """Everything a SQLite storage holds, logically: per study its directions, user and system attrs, and every
    trial's number, state, params, distributions, values, intermediate values, attrs and times."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
    try:
        out = {}
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            sid = storage.get_study_id_from_name(summary.study_name)
            trials = [
                {"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
                 "distributions": {k: repr(v) for k, v in t.distributions.items()},
                 "intermediate": t.intermediate_values, "user_attrs": t.user_attrs,
                 "system_attrs": t.system_attrs, "start": t.datetime_start, "complete": t.datetime_complete}
                for t in storage.get_all_trials(sid, deepcopy=False)
            ]
            out[summary.study_name] = {"directions": [d.name for d in summary.directions],
                                       "user_attrs": storage.get_study_user_attrs(sid),
                                       "system_attrs": storage.get_study_system_attrs(sid), "trials": trials}
        return out
    finally:
        storage.engine.dispose()


@dataclass
class Env:
    """Everything the cases need: a good job, a stored study, and broken variants of models and data."""

    root: Path
    job: Path
    db: Path
    models: dict[str, Path]

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def variant(self, name: str, old: str, new: str) -> Path:
        """A copy of the good job YAML with ``old`` replaced by ``new`` (same folder: data paths still resolve)."""
        text = self.job.read_text()
        assert old in text, old
        path = self.root / f"{name}.yaml"
        path.write_text(text.replace(old, new))
        return path

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def run(self, config: Path, *extra: str, url: str | None = None, study: str = "s") -> list[str]:
        return ["run", str(config), "--storage", url or self.url, "--study", study, "--trials", "3",
                "--no-progress", *extra]


def _broken_models(root: Path, models: dict[str, Path]) -> dict[str, Path]:
    """Variants of expert ``a``: non-finite weights, truncated file, no tokenizer/config, pickle only, ..."""
    out: dict[str, Path] = {}
    a = models["a"]
    out["wide"] = make_tiny_llama(root / "wide", seed=5, hidden=48)
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        d = root / name
        shutil.copytree(a, d)
        state = load_file(d / "model.safetensors")
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = value
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        out[name] = d
    d = root / "trunc"
    shutil.copytree(a, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    out["trunc"] = d
    d = root / "notok"
    shutil.copytree(models["base"], d)
    for f in d.iterdir():
        if "token" in f.name or f.name.endswith((".model", ".jinja")):
            f.unlink()
    out["notok"] = d
    d = root / "noconfig"
    shutil.copytree(a, d)
    (d / "config.json").unlink()
    out["noconfig"] = d
    d = root / "badconfig"
    shutil.copytree(a, d)
    (d / "config.json").write_text("{ not json")
    out["badconfig"] = d
    d = root / "pickled"
    shutil.copytree(a, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    out["pickled"] = d
    d = root / "empty"
    d.mkdir()
    (d / "config.json").write_text((a / "config.json").read_text())
    out["empty"] = d
    # broken like "nan", but in a folder named as the stored study's model: the job keeps the study's meaning,
    # so the run takes the driver lease before its worker fails on the model
    shutil.copytree(out["nan"], root / "same" / a.name)
    out["same-name"] = root / "same" / a.name
    return out


@pytest.fixture(scope="module")
def env(tiny_models, tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad")
    job = write_job(root, tiny_models)
    broken = _broken_models(root / "m", tiny_models)
    e = Env(root=root, job=job, db=root / "stored.db", models={**tiny_models, **broken})
    # the stored study every storage-touching case must leave unchanged
    try:
        main(["run", str(job), "--storage", e.url, "--study", "s", "--trials", "2", "--no-progress"])
    except SystemExit as exc:
        assert not exc.code, exc.code
    shutil.copy(e.db, root / "stored.orig.db")
    # a study made by plain Optuna (another tool), with other objectives, in its own file
    other = optuna.create_study(storage=f"sqlite:///{root / 'other.db'}", study_name="s", directions=["minimize"])
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    # a study whose lease a live driver (pid 1 on this host) refreshed just now
    shutil.copy(e.db, root / "leased.db")
    leased = optuna.load_study(study_name="s", storage=f"sqlite:///{root / 'leased.db'}")
    leased.set_user_attr("driver_lease", {"owner": f"{socket.gethostname()}:1:feedbeef", "time": time.time() + 3600,
                                          "released": False})
    return e


def _model(env: Env, which: str) -> Path:
    return env.variant(f"model_{which}", f"models: [{env.models['a']}", f"models: [{env.models[which]}")


def _data(env: Env, name: str, content: str) -> Path:
    env.write(f"data/{name}.jsonl", content)
    return env.variant(f"data_{name}", "data/reverse_search.jsonl", f"data/{name}.jsonl")


_EM = "{type: exact_match, name: reverse, data: data/reverse_search.jsonl, test: data/reverse_test.jsonl}"


@dataclass(frozen=True)
class Case:
    """A bad input: the argv it builds, words the one error line must contain, the file that must not change."""

    id: str
    argv: Callable[[Env], list[str]]
    expect: tuple[str, ...]
    guard: str | None = "stored.db"  # storage file (under env.root) compared before/after; None: nothing stored
    code: int | None = None  # exact exit code expected (else any non-zero)
    #: the run takes (and gives back) the driver lease before it fails: the storage is compared logically only
    leased: bool = False


CASES = [
    # ---- config files and YAML
    Case("config-missing", lambda e: e.run(e.root / "nope.yaml"), ("nope.yaml", "not found")),
    Case("config-is-dir", lambda e: e.run(e.root / "data"), ("data", "not found")),
    Case("config-binary", lambda e: e.run(e.write("bin.yaml", b"\xff\xfe\x00garbage\x9c")), ("bin.yaml",)),
    Case("yaml-malformed", lambda e: e.run(e.write("mal.yaml", "base_model: x\nmodels: [a, b\n")),
         ("mal.yaml", "line", "malformed YAML")),
    Case("yaml-top-list", lambda e: e.run(e.write("list.yaml", "- a\n- b\n")), ("list.yaml", "mapping")),
    Case("yaml-empty", lambda e: e.run(e.write("empty.yaml", "")), ("empty.yaml", "mapping")),
    Case("yaml-python-tag",
         lambda e: e.run(e.write("tag.yaml", "base_model: !!python/object/apply:os.system [echo]\n")),
         ("tag.yaml", "python/object")),
    Case("unknown-top-key", lambda e: e.run(e.variant("k1", "models:", "modles:")),
         ("unknown key 'modles'", "did you mean 'models'")),
    Case("unknown-nested-key", lambda e: e.run(e.variant("k2", "optimizer: random", "optimiser: random")),
         ("search.optimiser", "did you mean 'optimizer'")),
    Case("unknown-execution-key", lambda e: e.run(e.variant("k3", "workers: 1", "wokers: 1")),
         ("execution.wokers", "did you mean 'workers'")),
    Case("unknown-objective-option",
         lambda e: e.run(e.variant("k4", "name: reverse,", "name: reverse, max_new_tokns: 3,")),
         ("max_new_tokns", "did you mean 'max_new_tokens'")),
    Case("wrong-type", lambda e: e.run(e.variant("t1", "trials: 4", "trials: many")), ("search.trials", "integer")),
    Case("out-of-range", lambda e: e.run(e.variant("t2", "trials: 4", "trials: 0")), ("search.trials", "greater")),
    Case("refine-step-out-of-range", lambda e: e.run(e.variant("t5", "seed: 0}", "seed: 0, refine_step: 2}")),
         ("search.refine_step", "less")),
    Case("range-low-gt-high", lambda e: e.run(e.variant("t3", "weight: [0, 1]", "weight: [1, 0]")),
         ("space.weight", "low (1.0) > high (0.0)")),
    Case("range-length", lambda e: e.run(e.variant("t4", "weight: [0, 1]", "weight: [0, 1, 2]")),
         ("space.weight", "[low, high]")),
    Case("granularity-zero",
         lambda e: e.run(e.variant("t5", "density: [0.2, 1]}", "density: [0.2, 1], granularity: 0}")),
         ("granularity",)),
    Case("bad-dtype", lambda e: e.run(e.variant("t6", "models:", "dtype: float8\nmodels:")), ("dtype", "float8")),
    Case("unknown-method", lambda e: e.run(e.variant("t7", "methods: [task_arithmetic, ties]", "methods: [tiez]")),
         ("tiez",)),
    Case("unknown-objective-type", lambda e: e.run(e.variant("t8", "type: l1_from_base", "type: l1_form_base")),
         ("l1_form_base",)),
    Case("duplicate-objective-names", lambda e: e.run(e.variant("t9", "name: sort_ll", "name: reverse")),
         ("repeated: reverse",)),
    Case("no-objectives", lambda e: e.run(e.write("noobj.yaml", e.job.read_text().split("objectives:")[0]
                                                   + "objectives: []\n")), ("objectives",)),
    Case("unknown-optimizer-yaml", lambda e: e.run(e.variant("o1", "optimizer: random", "optimizer: nsga9")),
         ("unknown optimizer 'nsga9'",)),
    Case("unknown-optimizer-option", lambda e: e.run(e.variant("o2", "seed: 0}", "seed: 0, options: {popsize: 3}}")),
         ("popsize",)),
    Case("reference-point-incomplete",
         lambda e: e.run(e.variant("o3", "seed: 0}", "seed: 0, reference_point: {reverse: 0}}")),
         ("reference_point",)),
    Case("unknown-initial-preset", lambda e: e.run(e.variant("o4", "seed: 0}", "seed: 0, initial: [unifrom]}")),
         ("unifrom",)),
    # ---- models (the stored study has the same objectives: it is opened, and must stay unchanged)
    Case("base-missing", lambda e: e.run(e.variant("m1", f"base_model: {e.models['base']}",
                                                   f"base_model: {e.root / 'no-base'}")), ("no-base",)),
    Case("model-mismatched", lambda e: e.run(_model(e, "wide")), ("wide", "shape")),
    Case("model-nan", lambda e: e.run(_model(e, "nan")), ("nan", "up_proj", "NaN or Inf")),
    Case("model-inf", lambda e: e.run(_model(e, "inf")), ("inf", "up_proj", "NaN or Inf")),
    Case("model-truncated", lambda e: e.run(_model(e, "trunc")), ("trunc",)),
    Case("model-no-config", lambda e: e.run(_model(e, "noconfig")), ("noconfig", "config.json")),
    Case("model-bad-config", lambda e: e.run(_model(e, "badconfig")), ("badconfig", "config.json")),
    Case("model-pickle-refused", lambda e: e.run(_model(e, "pickled")), ("pickled", "--allow-pickle")),
    Case("model-no-tensors", lambda e: e.run(_model(e, "empty")), ("empty", "no tensors")),
    Case("model-broken-same-name", lambda e: e.run(_model(e, "same-name")), ("same", "up_proj", "NaN or Inf"),
         leased=True),
    Case("tokenizer-missing", lambda e: e.run(e.variant("m2", f"base_model: {e.models['base']}",
                                                        f"base_model: {e.models['notok']}")), ("notok", "tokenizer")),
    # ---- data files
    Case("data-missing", lambda e: e.run(e.variant("d1", "data/reverse_search", "data/nothere")), ("nothere.jsonl",)),
    Case("jsonl-bad-line", lambda e: e.run(_data(e, "badline", '{"prompt": "a", "answer": "b"}\n{"prompt": oops}\n')),
         ("badline.jsonl:2", "malformed JSON")),
    Case("jsonl-missing-field",
         lambda e: e.run(_data(e, "nofield", '{"prompt": "a", "answer": "b"}\n{"prompt": "c"}\n')),
         ("nofield.jsonl:2", "answer")),
    Case("jsonl-not-object", lambda e: e.run(_data(e, "notobj", '[1, 2]\n')), ("notobj.jsonl:1", "object")),
    Case("jsonl-empty", lambda e: e.run(_data(e, "empty", "\n\n")), ("empty.jsonl", "no examples")),
    # ---- storages and studies
    Case("study-other-tool", lambda e: e.run(e.job, url=f"sqlite:///{e.root / 'other.db'}"),
         ("objectives", "other.db"), guard="other.db"),
    Case("storage-dir-missing", lambda e: e.run(e.job, url=f"sqlite:///{e.root / 'nodir' / 'x.db'}"),
         ("cannot open storage",), guard=None),
    Case("storage-password-masked", lambda e: e.run(e.job, url="postgresql://user:s3cr3t@127.0.0.1:1/db"),
         ("cannot open storage", "postgresql://user:***@127.0.0.1:1/db"), guard=None),
    Case("storage-read-only", lambda e: e.run(e.job, url=f"sqlite:///file:{e.db}?mode=ro&uri=true"),
         ("readonly database", "stored.db")),
    Case("study-locked-by-live-driver", lambda e: e.run(e.job, url=f"sqlite:///{e.root / 'leased.db'}"),
         ("being run by another driver", ":1,"), guard="leased.db"),
    Case("front-storage-missing", lambda e: ["front", "--storage", f"sqlite:///{e.root / 'none.db'}", "--study", "s"],
         ("none.db", "not found"), guard=None),
    Case("front-study-missing", lambda e: ["front", "--storage", e.url, "--study", "nope"], ("nope", "available: s")),
    Case("front-bad-format", lambda e: ["front", "--storage", e.url, "--study", "s", "--format", "xml"], ("xml",)),
    Case("front-bad-plot", lambda e: ["front", "--storage", e.url, "--study", "s", "--plot", str(e.root / "p.gif")],
         ("p.gif",)),
    Case("pick-study-other-tool", lambda e: ["pick", "--storage", f"sqlite:///{e.root / 'other.db'}", "--study", "s",
                                             "--out", str(e.root / "o1")], ("not created by mergesearch",),
         guard="other.db"),
    # ---- preferences
    Case("prefer-unknown-objective", lambda e: ["pick", "--storage", e.url, "--study", "s", "--prefer", "revrse=1"],
         ("revrse",)),
    Case("prefer-negative", lambda e: ["pick", "--storage", e.url, "--study", "s", "--prefer", "reverse=-1"],
         ("reverse",)),
    Case("prefer-all-zero", lambda e: ["pick", "--storage", e.url, "--study", "s", "--prefer", "reverse=0,l1=0"],
         ("zero",)),
    Case("prefer-malformed", lambda e: ["pick", "--storage", e.url, "--study", "s", "--prefer", "reverse:1"],
         ("reverse:1",)),
    Case("min-unknown", lambda e: ["pick", "--storage", e.url, "--study", "s", "--min", "nothing=3"], ("nothing",)),
    Case("pick-bad-method", lambda e: ["pick", "--storage", e.url, "--study", "s", "--method", "best"], ("best",)),
    Case("pick-out-not-empty", lambda e: ["pick", "--storage", e.url, "--study", "s", "--out", str(e.root / "data")],
         ("data", "--overwrite")),
    # ---- command lines
    Case("unknown-option", lambda e: ["run", str(e.job), "--trails", "3"], ("--trails",), code=2),
    Case("missing-argument", lambda e: ["run"], ("CONFIG",), code=2),
    Case("unknown-command", lambda e: ["serve"], ("serve",), code=2),
    Case("trials-zero", lambda e: ["run", str(e.job), "--trials", "0"], ("--trials",), code=2),
    Case("unknown-optimizer-cli", lambda e: e.run(e.job, "--optimizer", "bogo"), ("unknown optimizer 'bogo'",)),
    Case("unknown-executor", lambda e: e.run(e.job, "--executor", "gpu"), ("executor", "gpu")),
    Case("conflicting-flags", lambda e: e.run(e.job, "--executor", "local", "--address", "auto"),
         ("conflicting", "--address", "--executor")),
    Case("eval-bad-split", lambda e: ["eval", str(e.job), "--model", str(e.models["a"]), "--split", "train"],
         ("train",), guard=None),
    Case("eval-model-missing", lambda e: ["eval", str(e.job), "--model", str(e.root / "ghost")], ("ghost",),
         guard=None),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, env: Env, capsys) -> None:
    argv = case.argv(env)
    shutil.copy(env.root / "stored.orig.db", env.db)  # a case that wrongly writes must not affect the next
    guard = env.root / case.guard if case.guard else None
    before = (sha(guard), snapshot(guard)) if guard else None
    code, err = cli(argv, capsys)
    assert code != 0, err
    if case.code is not None:
        assert code == case.code, err
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("error: ") and "Traceback" not in line, line
    for word in case.expect:
        assert word.lower() in line.lower(), (word, line)
    if guard:
        assert snapshot(guard) == before[1], f"{guard.name} changed"
        if not case.leased:
            assert sha(guard) == before[0], f"{guard.name} changed (bytes)"


def test_at_least_thirty_distinct_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 30


def _sub(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mergesearch.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kw)


def test_subprocess_usage_error_one_line_exit_2(tmp_path) -> None:
    res = _sub(["run", "--no-such-flag"])
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--no-such-flag" in lines[0] and "Traceback" not in res.stderr


def test_subprocess_config_error_and_debug_traceback(env: Env) -> None:
    bad = env.variant("sub", "models:", "modles:")
    res = _sub(["run", str(bad)])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "did you mean 'models'" in lines[0]
    res = _sub(["--debug", "run", str(bad)])
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_storage_error_message_has_no_password_in_debug_free_output() -> None:
    res = _sub(["front", "--storage", "postgresql://admin:hunter2@127.0.0.1:1/x", "--study", "s"])
    assert res.returncode != 0 and "hunter2" not in res.stderr + res.stdout and "Traceback" not in res.stderr


def test_json_front_still_reads_the_stored_study(env: Env, capsys) -> None:
    """Sanity: the stored study the cases guard is a real, readable mergesearch study."""
    capsys.readouterr()
    main(["front", "--storage", env.url, "--study", "s", "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in out["objectives"]] == ["reverse", "sort_ll", "l1"]
