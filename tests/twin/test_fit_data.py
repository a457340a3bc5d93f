"""``space.twin.fit_data``: routed twins are fitted (router and distillation) on prompts that are not the ones their
trials are scored on. The fit and scoring prompts are checked disjoint; the router and the distillation are spied
on to see that they get the fit prompts and never a scoring prompt; bad fit data is one line and stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from mergesearch.errors import ConfigError
from mergesearch.twin.data import check_disjoint, check_fit_data, fit_prompts, read_fit_prompts
from tests.conftest import write_job
from tests.support.cli import run_cli as _cli
from tests.support.cli import run_study
from tests.twin.conftest import EXPERTS, make_merger, prompts, shared_plan

TASKS = ("  - {type: exact_match, name: reverse, data: data/reverse_search.jsonl, test: data/reverse_test.jsonl}\n"
         "  - {type: loglik, name: sort_ll, data: data/sort_search.jsonl, test: data/sort_test.jsonl}\n"
         "  - {type: extra_params, name: extra}\n")


def _write(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return path


def _split(task: str) -> tuple[list[str], list[str]]:
    """(fit, scoring): 24 distinct prompts of ``task``, the first 12 to fit on, the last 12 to score."""
    everything = prompts(task, 24)
    return everything[:12], everything[12:]


# ------------------------------------------------------------------------------------------------ pure checks

def test_disjoint_fit_and_scoring_prompts_pass_and_any_shared_prompt_is_refused() -> None:
    fit, scoring = _split("reverse")
    assert not set(fit) & set(scoring)
    check_disjoint(fit, scoring)
    with pytest.raises(ConfigError) as err:
        check_disjoint([*fit, scoring[3]], scoring, key="space.twin.fit_data.reverse")
    text = str(err.value)
    assert text.startswith("space.twin.fit_data.reverse: 1 of 13 fit prompts are also prompts the trials are scored")
    assert repr(scoring[3]) in text and "\n" not in text
    # whitespace does not hide a shared prompt
    with pytest.raises(ConfigError, match="1 of 1 fit prompts"):
        check_disjoint([" " + scoring[0] + " "], scoring)


def test_fit_prompts_come_from_the_file_and_default_to_the_scoring_prompts(tmp_path: Path) -> None:
    fit, scoring = _split("swap")
    path = _write(tmp_path / "swap_fit.jsonl", fit)
    assert fit_prompts("swap", path, scoring) == fit
    assert fit_prompts("swap", None, scoring) == scoring  # no fit file: the search prompts, as before
    _write(path, [*fit, scoring[0]])
    with pytest.raises(ConfigError, match=r"^space\.twin\.fit_data\.swap: 1 of 13 fit prompts"):
        fit_prompts("swap", path, scoring)
    txt = tmp_path / "swap_fit.txt"
    txt.write_text("\n".join(fit) + "\n")
    assert read_fit_prompts(txt) == fit


@pytest.mark.parametrize(("mapping", "needle"), [
    ({"reverse": "R", "swap": "S", "sort": "T", "nope": "R"}, "'nope' is not a routed task objective"),
    ({"reverse": "R", "swap": "S"}, "no fit prompts for 'sort'"),
    ({"reverse": "R", "swap": "S", "sort": "/no/such/file.jsonl"}, "space.twin.fit_data.sort: /no/such/file.jsonl"),
    ({"reverse": "R", "swap": "S", "sort": "EMPTY"}, "space.twin.fit_data.sort: "),
    ({"reverse": "R", "swap": "S", "sort": "BAD"}, "needs a 'prompt' or 'text' string"),
])
def test_bad_fit_data_is_one_line(tmp_path: Path, mapping: dict[str, str], needle: str) -> None:
    files = {"R": _write(tmp_path / "r.jsonl", ["<reverse> 1 2 3 4 ="]),
             "S": _write(tmp_path / "s.jsonl", ["<swap> 1 2 3 4 ="]),
             "EMPTY": tmp_path / "empty.jsonl", "BAD": tmp_path / "bad.jsonl"}
    files["EMPTY"].write_text("\n")
    files["BAD"].write_text(json.dumps({"answer": "1"}) + "\n")
    with pytest.raises(ConfigError) as err:
        check_fit_data({k: files.get(v, v) for k, v in mapping.items()}, list(EXPERTS))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_config_refuses_an_empty_mapping_and_resolves_paths_against_the_job(tiny_models, tmp_path: Path) -> None:
    from mergesearch.config import TwinSpace, load_config

    with pytest.raises(ValueError, match="fit_data: name one prompt file per routed task objective"):
        TwinSpace.model_validate({"rank": 1, "fit_data": {}})
    job = write_job(tmp_path, tiny_models, objectives=TASKS)
    job.write_text(job.read_text().replace(
        "density: [0.2, 1]}", "density: [0.2, 1], twin: {rank: 1, fit_data: {reverse: fit/r.jsonl, sort_ll: s.txt}}}"))
    fit = load_config(job).space.twin.fit_data
    assert fit == {"reverse": (tmp_path / "fit" / "r.jsonl").resolve(), "sort_ll": (tmp_path / "s.txt").resolve()}


# ------------------------------------------------------------------------------------------------ the candidate

@pytest.fixture
def fit_setup(twin_models, tmp_path: Path, monkeypatch):
    """A fresh merger, a context whose objectives score SCORING prompts, fit files of FIT prompts, and spies on
    the router's training prompts and the teachers' prompts."""
    from mergesearch.candidates import CandidateContext
    from mergesearch.objectives.scoring import encode_prompt
    from mergesearch.twin import build as build_module
    from mergesearch.twin import distill as distill_module

    merger = make_merger(twin_models)
    split = {t: _split(t) for t in EXPERTS}
    files = {t: str(_write(tmp_path / f"{t}_fit.jsonl", split[t][0])) for t in EXPERTS}
    ctx = CandidateContext(merger, merger.tokenizer, lambda objective: list(split[objective][1]), seed=0)
    seen: dict[str, list] = {"router": [], "teacher": []}
    real_router, real_teacher = build_module.train_router, distill_module.expert_teacher

    def router_spy(model, tokenizer, texts, *args, **kwargs):
        seen["router"].append([list(group) for group in texts])
        return real_router(model, tokenizer, texts, *args, **kwargs)

    def teacher_spy(model, tokenizer, ids, *args, **kwargs):
        seen["teacher"].append([list(p) for p in ids])
        return real_teacher(model, tokenizer, ids, *args, **kwargs)

    monkeypatch.setattr(build_module, "train_router", router_spy)
    monkeypatch.setattr(distill_module, "expert_teacher", teacher_spy)

    def encode(texts: list[str]) -> list[list[int]]:
        return [list(encode_prompt(merger.tokenizer, p, False)) for p in texts]

    return {"merger": merger, "ctx": ctx, "split": split, "files": files, "seen": seen, "encode": encode,
            "models": twin_models}


def _twin(setup, fit_data) -> object:
    from mergesearch.candidates import Twin

    return Twin(shared_plan(setup["models"]), 1, tuple((t, str(setup["models"][t])) for t in EXPERTS),
                {"steps": 5, "width": 4}, distill={"steps": 1, "batch": 4, "max_new_tokens": 2, "top_k": 4},
                fit_data=fit_data)


def test_router_and_distillation_see_the_fit_prompts_and_never_a_scoring_prompt(fit_setup) -> None:
    from mergesearch.candidates import candidate_from

    s = fit_setup
    twin = _twin(s, s["files"])
    assert candidate_from(twin.spec()).spec() == twin.spec()  # stored with the trial, rebuilt the same
    assert twin.spec()["fit_data"] == s["files"]
    model = twin.build(s["ctx"])
    try:
        assert model.distill_report is not None  # the factors were fitted
    finally:
        twin.release(model)
    (router_prompts,) = s["seen"]["router"]
    assert router_prompts == [s["split"][t][0] for t in EXPERTS]
    teacher_ids = s["seen"]["teacher"]
    assert teacher_ids == [s["encode"](s["split"][t][0]) for t in EXPERTS]
    scoring = {p for t in EXPERTS for p in s["split"][t][1]}
    assert not scoring & {p for group in router_prompts for p in group}
    scoring_ids = {tuple(i) for i in s["encode"](sorted(scoring))}
    assert not scoring_ids & {tuple(i) for group in teacher_ids for i in group}


def test_without_fit_data_the_twin_fits_on_the_scoring_prompts(fit_setup) -> None:
    s = fit_setup
    twin = _twin(s, None)
    assert "fit_data" not in twin.spec()  # specs of older studies read back the same
    twin.release(twin.build(s["ctx"]))
    assert s["seen"]["router"] == [[s["split"][t][1] for t in EXPERTS]]
    assert s["seen"]["teacher"] == [s["encode"](s["split"][t][1]) for t in EXPERTS]


def test_a_fit_file_sharing_a_scoring_prompt_fails_before_any_fitting(fit_setup) -> None:
    s = fit_setup
    leaky = dict(s["files"])
    _write(Path(leaky["swap"]), [*s["split"]["swap"][0], s["split"]["swap"][1][5]])
    with pytest.raises(ConfigError, match=r"^space\.twin\.fit_data\.swap: 1 of 13 fit prompts are also"):
        _twin(s, leaky).build(s["ctx"])
    assert s["seen"] == {"router": [], "teacher": []}


# ------------------------------------------------------------------------------------------------ a search

def _job(tiny_models, tmp_path: Path, fit: str) -> Path:
    job = write_job(tmp_path, tiny_models, objectives=TASKS)
    twin = f"{{rank: 1, router: {{steps: 20, width: 4}}, distill: {{steps: 1, batch: 4, max_new_tokens: 2}}, {fit}}}"
    job.write_text(job.read_text().replace("density: [0.2, 1]}", f"density: [0.2, 1], twin: {twin}}}"))
    return job


def test_a_search_with_fit_data_stores_it_with_every_trial(tiny_models, tmp_path: Path, capsys) -> None:
    job = _job(tiny_models, tmp_path, "fit_data: {reverse: fit/reverse.txt, sort_ll: fit/sort.txt}")
    (tmp_path / "fit").mkdir()
    for task in ("reverse", "sort"):
        fit = [f"<{task}> 9 9 9 1 =", f"<{task}> 9 9 9 2 ="]
        searched = [json.loads(line)["prompt"] for line in (tmp_path / "data" / f"{task}_search.jsonl").open()]
        assert not set(fit) & set(searched)
        (tmp_path / "fit" / f"{task}.txt").write_text("\n".join(fit) + "\n")
    trials = run_study(job, f"sqlite:///{tmp_path / 't.db'}", 2, capsys)
    for t in trials:
        assert t.user_attrs["candidate"]["fit_data"] == {"reverse": str(tmp_path / "fit" / "reverse.txt"),
                                                         "sort_ll": str(tmp_path / "fit" / "sort.txt")}


@pytest.mark.parametrize(("fit", "needle"), [
    ("fit_data: {reverse: r.txt, sort_ll: s.txt, nope: r.txt}", "'nope' is not a routed task objective"),
    ("fit_data: {reverse: r.txt}", "no fit prompts for 'sort_ll'"),
    ("fit_data: {reverse: r.txt, sort_ll: missing.txt}", "space.twin.fit_data.sort_ll: "),
    ("fit_data: {}", "fit_data: name one prompt file per routed task objective"),
])
def test_bad_fit_data_in_a_job_is_one_line_and_stores_nothing(tiny_models, tmp_path: Path, capsys, fit: str,
                                                             needle: str) -> None:
    job = _job(tiny_models, tmp_path, fit)
    (tmp_path / "r.txt").write_text("<reverse> 9 9 9 1 =\n")
    (tmp_path / "s.txt").write_text("<sort> 9 9 9 1 =\n")
    db = tmp_path / "bad.db"
    code, _, err = _cli(["run", str(job), "--storage", f"sqlite:///{db}", "--study", "b", "--no-progress"], capsys)
    assert code != 0
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists() or not optuna.get_all_study_summaries(f"sqlite:///{db}")
