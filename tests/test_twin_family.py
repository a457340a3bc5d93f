"""Twin-Merging as a candidate family in a search: stored, picked, exported, reloaded and re-scored through the
same paths as static merges; bad twin spaces refused with one line and nothing stored."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from tests.conftest import write_job
from tests.support.cli import run_cli as _cli
from tests.support.cli import run_study

TASKS = ("  - {type: exact_match, name: reverse, data: data/reverse_search.jsonl, test: data/reverse_test.jsonl}\n"
         "  - {type: loglik, name: sort_ll, data: data/sort_search.jsonl, test: data/sort_test.jsonl}\n"
         "  - {type: extra_params, name: extra}\n")




def _job(tiny_models, tmp_path: Path, twin: str) -> Path:
    job = write_job(tmp_path, tiny_models, objectives=TASKS)
    job.write_text(job.read_text().replace("density: [0.2, 1]}", f"density: [0.2, 1], twin: {twin}}}"))
    return job


def test_twin_study_stores_picks_exports_and_rescores(tiny_models, tmp_path: Path, capsys) -> None:
    from mergesearch.candidates import load_model
    from mergesearch.twin import RoutedModel

    job = _job(tiny_models, tmp_path, "{rank: [1, 4], router: {steps: 50}}")
    url = f"sqlite:///{tmp_path / 't.db'}"
    trials = run_study(job, url, 3, capsys)
    for t in trials:
        assert t.user_attrs["family"] == "twin" and 1 <= t.user_attrs["candidate"]["rank"] <= 4
        assert t.user_attrs["candidate"]["experts"] == [["reverse", str(tiny_models["a"])],
                                                       ["sort_ll", str(tiny_models["b"])]]
        assert t.values[2] > 0  # the low-rank experts and the router are extra parameters
    out = tmp_path / "picked"
    code, text, err = _cli(["pick", "--storage", url, "--study", "t", "--family", "twin", "--out", str(out)],
                           capsys)
    assert code == 0, err
    assert (out / "twin.json").is_file() and (out / "recipe.yaml").is_file()
    model = load_model(out)
    assert isinstance(model, RoutedModel)
    # export -> load_model -> eval reproduces the stored scores
    scores = json.loads((out / "scores.json").read_text())
    assert scores["family"] == "twin"
    code, text, err = _cli(["eval", str(job), "--model", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(text) == pytest.approx(scores["values"], rel=1e-5, abs=1e-5)
    code, _, err = _cli(["pick", "--storage", url, "--study", "t", "--family", "static"], capsys)
    assert code != 0 and "no trial of that family" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("twin", "models", "needle"), [
    ("{rank: 40}", "ab", "space.twin.rank: 40 is larger than tensor"),
    ("{rank: 2, experts: {nope: 0, sort_ll: 1}}", "ab", "unknown objective 'nope'"),
    ("{rank: 2, experts: {reverse: /no/such/model, sort_ll: 1}}", "ab", "unknown model '/no/such/model'"),
    ("{rank: 2}", "a", "needs at least two experts; the job has 1 model"),
    ("{rank: 2, targets: {attn: {modules: [q_projx]}}}", "ab",
     "space.twin.targets.attn: module 'q_projx' matches no linear module of the decoder layers"),
    ("{rank: 2, targets: {all: {}, early: {layers: [7]}}}", "ab",
     "space.twin.targets.early: layer 7 does not exist (the base has layers 0..1)"),
    ("{rank: 40, targets: {mlp: {modules: [mlp.down_proj]}}}", "ab",
     "space.twin.rank: 40 is larger than tensor 'model.layers.0.mlp.down_proj.weight' (32, 64)"),
])
def test_bad_twin_spaces_are_one_line_and_store_nothing(tiny_models, tmp_path: Path, capsys, twin, models,
                                                        needle) -> None:
    job = _job(tiny_models, tmp_path, twin)
    if models == "a":
        job.write_text(job.read_text().replace(f", {tiny_models['b']}]", "]"))
    db = tmp_path / "bad.db"
    code, _, err = _cli(["run", str(job), "--storage", f"sqlite:///{db}", "--study", "b", "--no-progress"], capsys)
    assert code != 0
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists() or not optuna.get_all_study_summaries(f"sqlite:///{db}")


def test_twin_targets_are_a_searched_choice_and_cost_exactly_what_they_add(tiny_models, tmp_path: Path,
                                                                         capsys) -> None:
    from safetensors.torch import load_file

    from mergesearch.candidates import stored_candidate

    twin = ("{rank: 2, router: {steps: 20, width: 8}, distill: {steps: 2, batch: 8, max_new_tokens: 3}, "
            "targets: {all: {}, qv0: {modules: [q_proj, v_proj], layers: [0]}}}")
    job = _job(tiny_models, tmp_path, twin)
    url = f"sqlite:///{tmp_path / 't.db'}"
    code, _, err = _cli(["run", str(job), "--storage", url, "--study", "t", "--trials", "6", "--no-progress"], capsys)
    assert code == 0, err
    trials = [t for t in optuna.load_study(study_name="t", storage=url).trials if t.state.name == "COMPLETE"]
    assert len(trials) == 6
    hidden, inter, layers, experts, rank = 32, 64, 2, 2, 2
    per_module = {"q_proj": 2 * hidden, "k_proj": 2 * hidden, "v_proj": 2 * hidden, "o_proj": 2 * hidden,
                  "gate_proj": hidden + inter, "up_proj": hidden + inter, "down_proj": hidden + inter}
    router = hidden * 8 + 8 + 8 * experts + experts + 2 * hidden
    static = sum(int(v.numel()) for v in load_file(str(tiny_models["base"] / "model.safetensors")).values())
    seen = set()
    for t in trials:
        choice = t.params["twin.targets"]
        seen.add(choice)
        spec = t.user_attrs["candidate"]
        assert spec["distill"]["steps"] == 2
        if choice == "all":
            assert "modules" not in spec and "layers" not in spec
            factors = experts * rank * layers * sum(per_module.values())
        else:
            assert spec["modules"] == ["q_proj", "v_proj"] and spec["layers"] == [0]
            factors = experts * rank * (per_module["q_proj"] + per_module["v_proj"])
        assert t.values[2] == pytest.approx((factors + router) / static, rel=1e-9)
        rebuilt = stored_candidate(t.user_attrs).spec()  # what is stored rebuilds the same candidate
        assert {k: v for k, v in rebuilt.items() if k not in ("family", "plan")} == spec
    assert seen == {"all", "qv0"}
    # the picked (distilled, targeted) twin exports as PEFT adapters on exactly its modules and re-scores the same
    qv0 = max((t for t in trials if t.params["twin.targets"] == "qv0"), key=lambda t: t.values[0])
    out = tmp_path / "picked"
    code, _, err = _cli(["export", "--storage", url, "--study", "t", "--trial", str(qv0.number), "--out", str(out)],
                        capsys)
    assert code == 0, err
    cfg = json.loads((out / "adapters" / "reverse" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    code, text, err = _cli(["eval", str(job), "--model", str(out), "--json"], capsys)
    assert code == 0, err
    assert json.loads(text) == pytest.approx(dict(zip(["reverse", "sort_ll", "extra"], qv0.values, strict=True)),
                                             rel=1e-5, abs=1e-5)
