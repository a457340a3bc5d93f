"""Multi-fidelity search: the promotion rule, nested rung subsets, staged evaluation, the examples budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mergesearch.config import load_config
from mergesearch.errors import ConfigError
from mergesearch.execution.local import LocalExecutor
from mergesearch.execution.worker import MergeWorkerFactory
from mergesearch.objectives import ObjectiveContext, build_objectives
from mergesearch.objectives.registry import evaluate_staged
from mergesearch.search.fidelity import RungHistory, Rungs, crowding, estimate, fit_rung_model, promoted
from mergesearch.search.loop import SearchRun
from mergesearch.search.pareto import load_front
from tests.conftest import write_job
from tests.support.cli import run_cli

MAX, MIN = -1.0, 1.0  # signs: value * sign is minimised

# --- the promotion rule -------------------------------------------------------------------------------------


def test_promotion_single_objective_keeps_the_top_fraction() -> None:
    seen = [[v / 10] for v in range(1, 10)]  # 0.1 .. 0.9; with own: 10 vectors, keep 1/3 -> best 4 go on
    assert promoted(seen, [0.85], [MAX], 1 / 3)  # 1 ahead
    assert promoted(seen, [0.65], [MAX], 1 / 3)  # 3 ahead (.7 .8 .9)
    assert not promoted(seen, [0.55], [MAX], 1 / 3)  # 4 ahead
    assert promoted(seen, [0.15], [MIN], 1 / 3) and not promoted(seen, [0.45], [MIN], 1 / 3)
    assert promoted(seen, [0.0], [MAX], 1.0)  # keep everything
    assert promoted([], [0.0], [MAX], 1 / 3)  # the first trial at a rung always goes on


def test_promotion_ties_favour_the_trial() -> None:
    # 8 examples give few distinct accuracies: a trial equal to all the others is not behind any of them
    assert promoted([[0.5, 0.5]] * 9, [0.5, 0.5], [MAX, MAX], 1 / 3)


def test_promotion_two_objectives_rank_then_crowding() -> None:
    front = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]  # mutually non-dominated (both maximised)
    seen = front + [[0.1, 0.1]] * 6  # dominated by [0.5, 0.5]; with own: 10 vectors, keep 1/3 -> 4
    assert promoted(seen, [0.2, 0.2], [MAX, MAX], 1 / 3)  # second front: the 3 of the first are ahead
    assert not promoted(seen, [0.05, 0.05], [MAX, MAX], 1 / 3)  # third front: 9 ahead
    # keep 0.2 -> 2: on the first front with the two extremes (infinite crowding) ahead is not enough
    assert not promoted(seen, [0.6, 0.6], [MAX, MAX], 0.2)
    assert promoted(seen, [2.0, 2.0], [MAX, MAX], 0.2)  # dominates everything: nothing ahead
    assert not promoted(seen, [0.2, 0.2], [MAX, MAX], 0.2)


def test_crowding_closed_form() -> None:
    import numpy as np

    cd = crowding(np.array([[0.0, 4.0], [1.0, 2.0], [4.0, 0.0]]))
    assert np.isinf(cd[0]) and np.isinf(cd[2])
    assert cd[1] == pytest.approx(4 / 4 + 4 / 4)


def test_rungs_must_increase(tiny_models, tmp_path) -> None:
    job = write_job(tmp_path, tiny_models, extra="")
    job.write_text(job.read_text().replace("seed: 0}", "seed: 0, fidelity: {rungs: [4, 2]}}"))
    with pytest.raises(ConfigError, match="rungs must be positive and increasing"):
        load_config(job)


# --- the regression estimator -------------------------------------------------------------------------------


def test_rung_model_closed_forms() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (40, 6)).astype(float)
    model = fit_rung_model(x, x.mean(axis=1) + 0.25)  # full = rung mean + a constant: nothing else to learn
    assert model.b0 == pytest.approx(0.25) and np.abs(model.beta).max() < 1e-6
    assert model([1, 0, 0, 1, 1, 0]) == pytest.approx(0.75)
    full = 0.3 + 0.4 * x[:, 2]  # the full score follows example 2 alone
    model = fit_rung_model(x, full)
    assert max(abs(model(r) - f) for r, f in zip(x, full, strict=True)) < 0.02
    assert fit_rung_model(x[:10], full[:10]) is None  # 10 < MIN_SCORED + 6 trials


def test_rung_estimates_rank_trials_better_than_rung_means() -> None:
    # 2PL outcomes P(correct) = σ(α_j (a_t − b_j)), half the examples near-uninformative (α = 0.2): trials
    # ranked by their estimate from a 16-example rung agree better with their 128-example accuracy (Spearman,
    # 5 seeds) than ranked by the rung's accuracy; the model is fitted on 60 complete trials, judged on 200 others
    import numpy as np
    from scipy.stats import spearmanr

    gains = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, b = rng.normal(0, 1, 260), rng.normal(0, 1, 128)
        alpha = np.where(np.arange(128) % 2 == 0, 3.0, 0.2)
        y = (rng.random((260, 128)) < 1 / (1 + np.exp(-alpha * (a[:, None] - b)))).astype(float)
        full = y.mean(axis=1)
        model = fit_rung_model(y[:60, :16], full[:60])
        est = [model(r) for r in y[60:, :16]]
        gains.append(spearmanr(est, full[60:])[0] - spearmanr(y[60:, :16].mean(axis=1), full[60:])[0])
    assert np.mean(gains) > 0.03 and min(gains) > -0.02


def test_rung_history_estimates_what_it_has_fitted() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    rows = [list(rng.integers(0, 2, 8).astype(float) * 0.5 + i / 40) for i in range(20)]
    history = RungHistory([4], ["x", "y"], estimator="regression")
    for r in rows:
        history.add([{"n": 4, "values": {"x": float(np.mean(r[:4])), "y": 1.0}}], {"x": r})
    history.add([{"n": 2, "values": {"x": 0.0, "y": 0.0}}], {})  # another rung size: left out
    models = history.models()
    assert set(models) == {"x"} and set(models["x"]) == {4}
    (seen,) = history.seen()
    assert len(seen) == 20 and {v[1] for v in seen} == {1.0}
    assert [v[0] for v in seen] == pytest.approx([models["x"][4](r[:4]) for r in rows])
    plain = RungHistory([4], ["x", "y"])
    for r in rows:
        plain.add([{"n": 4, "values": {"x": float(np.mean(r[:4])), "y": 1.0}}], {"x": r})
    assert plain.models() == {} and plain.seen()[0][0][0] == pytest.approx(np.mean(rows[0][:4]))
    assert estimate({"x": 0.1, "y": 2.0}, {"x": rows[0][:4]}, models) == {"x": models["x"][4](rows[0][:4]),
                                                                          "y": 2.0}


# --- nested subsets and staged evaluation -------------------------------------------------------------------


@pytest.fixture
def task_objectives(tiny_models, tmp_path):
    """The tiny job's two task objectives (exact_match, loglik; 8 examples each) and a model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(write_job(tmp_path, tiny_models))
    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"])
    tok = AutoTokenizer.from_pretrained(tiny_models["a"])
    return config, build_objectives(config.objectives[:2], ObjectiveContext()), model, tok


def test_rung_subsets_nest_and_equal_a_smaller_limit(task_objectives, tmp_path) -> None:
    config, objectives, model, tok = task_objectives
    for o, oc in zip(objectives, config.objectives[:2], strict=True):
        full = o.score(model, tok)
        # rung N1's examples are the first N1 of rung N2's, and scoring them in two stages changes nothing
        assert o.score(model, tok, 0, 3) + o.score(model, tok, 3, 5) == full[:5]
        (small,) = build_objectives([oc.model_copy(update={"limit": 3})], ObjectiveContext())
        assert [r["line"] for r in small.score(model, tok)] == [r["line"] for r in full[:3]]
        assert small(model, tok) == pytest.approx(o.reduce(full[:3]))


def test_evaluate_staged_stops_a_dominated_trial(task_objectives) -> None:
    _, objectives, model, tok = task_objectives
    names = tuple(o.name for o in objectives)
    open_rungs = Rungs(sizes=(2, 4), keep=1 / 3, names=names, signs=(MAX, MAX))
    staged = evaluate_staged(objectives, model, tok, open_rungs)
    full = evaluate_staged(objectives, model, tok)
    assert staged.values == pytest.approx(full.values)
    assert staged.examples == full.examples == 16  # each example once, not once per rung
    assert len(staged.rungs) == 2
    for o in objectives:  # a rung's value is the objective on that prefix
        assert staged.rungs[0][o.name] == pytest.approx(o.reduce(o.score(model, tok, 0, 2)))
    better = ((2.0, 1e9),) * 5  # five earlier trials far ahead at rung 0
    stopped = evaluate_staged(objectives, model, tok, Rungs((2, 4), 1 / 3, names, (MAX, MAX), seen=(better,)))
    assert stopped.values is None and len(stopped.rungs) == 1 and stopped.examples == 4


# --- the search loop with rungs and an examples budget ------------------------------------------------------


def _job(tiny_models, root: Path, search: str) -> Path:
    job = write_job(root, tiny_models)
    job.write_text(job.read_text().replace("search: {optimizer: random, trials: 4, seed: 0}", f"search: {search}"))
    return job


def _run(job: Path, url: str, **kw) -> SearchRun:
    run = SearchRun(load_config(job), storage=url, study_name="f", **kw)
    pool = LocalExecutor(MergeWorkerFactory(run.config))
    try:
        run.run(pool)
    finally:
        pool.close()
    return run


def test_rungs_prune_and_pruned_trials_stay_off_the_front(tiny_models, tmp_path, capsys) -> None:
    job = _job(tiny_models, tmp_path, "{optimizer: random, trials: 8, seed: 1, baselines: false, "
                                      "fidelity: {rungs: [2, 4], keep: 0.34}}")
    url = f"sqlite:///{tmp_path / 'f.db'}"
    run = _run(job, url)
    trials = optuna.load_study(study_name="f", storage=url).trials
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == 8 and states.count(TrialState.PRUNED) >= 1
    for t in trials:
        rungs = t.user_attrs["rungs"]
        assert [r["n"] for r in rungs] == [2, 4][: len(rungs)]
        # examples: 2 task objectives x (last rung reached, or all 8 when complete)
        n = 8 if t.state == TrialState.COMPLETE else rungs[-1]["n"]
        assert t.user_attrs["examples"] == 2 * n
        if t.state == TrialState.PRUNED:
            assert t.values is None and "plan" in t.user_attrs
    assert run.examples == sum(t.user_attrs["examples"] for t in trials)
    front = load_front(url, "f")
    pruned = {t.number for t in trials if t.state == TrialState.PRUNED}
    assert pruned and not pruned & {p.number for p in front.trials}
    # the CLI: `show` gives a pruned trial's partial scores, `front` counts pruned trials and examples
    first = min(pruned)
    code, out, _ = run_cli(["show", str(job), "--storage", url, "--study", "f", "--trial", str(first)], capsys)
    rung = trials[first].user_attrs["rungs"][0]
    assert code == 0 and f"trial {first} of study 'f': PRUNED" in out and "scores:" not in out
    assert f"rung 1 ({rung['n']} examples per task): reverse={rung['values']['reverse']:.6g}" in out
    code, out, _ = run_cli(["front", str(job), "--storage", url, "--study", "f"], capsys)
    assert f"8 complete, {len(pruned)} pruned" in out and f"{run.examples} examples scored" in out


def test_estimator_stores_per_example_values_and_a_resumed_run_fits_the_same(tiny_models, tmp_path) -> None:
    job = _job(tiny_models, tmp_path, "{optimizer: random, trials: 10, seed: 2, baselines: false, "
                                      "fidelity: {rungs: [2, 4], keep: 1.0, estimator: regression}}")
    url = f"sqlite:///{tmp_path / 'e.db'}"
    run = _run(job, url)
    trials = optuna.load_study(study_name="f", storage=url).trials
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 10
    for t in trials:
        per = t.user_attrs["per_example"]  # loglik's score is not a mean of its examples' values: left out
        assert set(per) == {"reverse"} and len(per["reverse"]) == 8
        # a rung's stored value is the mean of its examples' values: what the estimator builds on
        assert t.user_attrs["rungs"][0]["values"]["reverse"] == pytest.approx(sum(per["reverse"][:2]) / 2)
    models = run._history.models()
    assert {n: set(m) for n, m in models.items()} == {"reverse": {2, 4}}  # 10 trials >= 5 + 4 examples
    resumed = SearchRun(load_config(job), storage=url, study_name="f")
    resumed._load_fidelity()
    assert resumed._history.models() == models and resumed._history.seen() == run._history.seen()
    rungs = resumed._job({})["rungs"]
    assert rungs.models == models and rungs.estimator == "regression"
    # seen at rung 0 are the trials' estimates there, not their rung means
    first = trials[0].user_attrs["per_example"]
    assert rungs.seen[0][0][0] == pytest.approx(models["reverse"][2](first["reverse"][:2]))


def test_max_examples_stops_at_the_budget_and_resumes_to_it(tiny_models, tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    job = _job(tiny_models, tmp_path, "{optimizer: random, trials: 50, seed: 0, baselines: false, max_examples: 40}")
    run = _run(job, url)  # 16 examples per trial: the third trial crosses 40
    trials = optuna.load_study(study_name="f", storage=url).trials
    assert len(trials) == 3 and run.examples == 48
    again = _run(job, url)  # spent: nothing more
    assert len(optuna.load_study(study_name="f", storage=url).trials) == 3 and again.examples == 48
    job.write_text(job.read_text().replace("max_examples: 40", "max_examples: 80"))
    more = _run(job, url)
    assert more.examples == 80 and len(optuna.load_study(study_name="f", storage=url).trials) == 5


REPO = Path(__file__).resolve().parents[2]
HOLD = ("import os, time\n\ndef hold(model, tokenizer, examples):\n"
        "    flag = os.path.join(os.path.dirname(__file__), 'held')\n"
        "    if os.path.exists(os.path.join(os.path.dirname(__file__), 'hold')) and not os.path.exists(flag):\n"
        "        open(flag, 'w').close()\n        time.sleep(60)\n"
        "    return 0.0\n")


@pytest.mark.slow
def test_crash_between_rungs_resumes_without_losing_or_double_counting(tiny_models, tmp_path) -> None:
    # objectives in order: the two tasks (scored on rung 0's 2 examples), then a python objective that blocks
    # once: the driver is killed there, mid-trial, after rung 0's examples were scored
    (tmp_path / "hold.py").write_text(HOLD)
    (tmp_path / "hold").touch()
    job = _job(tiny_models, tmp_path, "{optimizer: random, trials: 4, seed: 0, baselines: false, "
                                      "fidelity: {rungs: [2, 4], keep: 1.0}}")
    job.write_text(job.read_text().replace("  - {type: l1_from_base, name: l1}\n",
                                           "  - {type: python, name: hold, target: 'hold.py:hold'}\n"))
    url = f"sqlite:///{tmp_path / 'c.db'}"
    argv = [sys.executable, "-m", "mergesearch.cli", "run", str(job), "--storage", url, "--study", "f",
            "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "held").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "held").exists(), proc.stderr.read().decode() if proc.poll() is not None else "no hold"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    trials = optuna.load_study(study_name="f", storage=url).trials
    assert [t.state for t in trials] == [TrialState.RUNNING] and "examples" not in trials[0].user_attrs
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0
    trials = optuna.load_study(study_name="f", storage=url).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and not [t for t in trials if t.state == TrialState.RUNNING]
    # the killed attempt is failed and counts nothing; its re-run counts its examples once
    assert trials[0].state == TrialState.FAIL and "examples" not in trials[0].user_attrs
    assert sum(t.user_attrs.get("examples", 0) for t in trials) == 4 * 16


# --- what the optimizer learns from: pruned trials at their last rung ---------------------------------------


def test_best_estimate_values_a_pruned_trial_at_its_last_rung() -> None:
    from optuna.distributions import FloatDistribution

    from mergesearch.search.fidelity import best_estimate

    dists = {"x": FloatDistribution(0.0, 1.0)}
    rungs = [{"n": 2, "values": {"l1": 3.0, "acc": 0.5}}, {"n": 4, "values": {"l1": 3.0, "acc": 0.25}}]
    pruned = optuna.trial.create_trial(params={"x": 0.3}, distributions=dists, state=TrialState.PRUNED,
                                       user_attrs={"rungs": rungs})
    seen = best_estimate(pruned, ["acc", "l1"])
    # the last rung (4 examples), in the study's objective order, as a COMPLETE trial; the stored one is unchanged
    assert seen.state == TrialState.COMPLETE and seen.values == [0.25, 3.0] and seen.params == {"x": 0.3}
    assert seen.number == pruned.number and seen._trial_id == pruned._trial_id
    assert pruned.state == TrialState.PRUNED and pruned.values is None
    assert best_estimate(pruned, ["acc", "other"]) is None  # scored under other objectives: not seen
    assert best_estimate(pruned, []) is None  # the study's objective names unknown: not seen
    no_scores = optuna.trial.create_trial(params={"x": 0.3}, distributions=dists, state=TrialState.PRUNED)
    assert best_estimate(no_scores, ["acc", "l1"]) is None
    complete = optuna.trial.create_trial(params={"x": 0.3}, distributions=dists, values=[1.0, 2.0],
                                         user_attrs={"rungs": rungs})
    assert best_estimate(complete, ["acc", "l1"]) is complete  # full fidelity: as stored


@pytest.mark.parametrize("backend", ["tpe", "gp", "nsga2", "qnehvi", "cmaes-sum"])
def test_optimizers_learn_pruned_trials_at_their_last_rung(backend) -> None:
    """Three studies with the same complete trials and six more trials at the same parameters: PRUNED with
    partial scores (last rung (2.5, 0.0): better than any complete trial), COMPLETE with those values, FAILED.
    Every backend proposes for the pruned ones what it proposes for the complete ones — and not what it proposes
    when it ignores them (failed), so hiding pruned trials, or reading another rung than the last, fails."""
    import numpy as np
    from optuna.distributions import FloatDistribution

    from mergesearch.search.optimizers import Optimizer

    dists = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    rng = np.random.default_rng(0)
    complete = [rng.random(2) for _ in range(12)]
    rungs = [{"n": 2, "values": {"f": -5.0, "g": 5.0}}, {"n": 4, "values": {"g": 0.0, "f": 2.5}}]
    # the extra trials score far better than the complete ones (f = x + y <= 2, g = x * y >= 0) at parameters
    # that the complete ones do not favour: a backend that learns from them moves there (NSGA-II: they are
    # parents; an elitist backend would drop trials worse than its population whether it saw them or not)
    extra = [(0.1 + 0.01 * i, 0.9 - 0.01 * i) for i in range(6)]

    def proposals(state: TrialState) -> list[dict[str, float]]:
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.set_user_attr("objective_names", ["f", "g"])  # as open_study stores them
        # NSGA-II generations of pop_size 4: the complete trials are generations 0-2, the extra ones 3
        generation = "NSGAIISampler:generation"
        for i, (x, y) in enumerate(complete):
            study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dists,
                                                      values=[x + y, x * y], system_attrs={generation: i // 4}))
        for x, y in extra:  # what a pruned trial stores: params, partial scores as attrs, no values
            study.add_trial(optuna.trial.create_trial(
                params={"x": x, "y": y}, distributions=dists, state=state, user_attrs={"rungs": rungs},
                values=[2.5, 0.0] if state == TrialState.COMPLETE else None, system_attrs={generation: 3}))
        options = {"pop_size": 4} if backend == "nsga2" else {"popsize": 4} if backend == "cmaes-sum" else \
            {"n_startup": 4}
        opt = Optimizer(study, dists, name=backend, seed=3, options=options)
        out = [t.params for t in opt.ask(2)]
        # the storage itself is not changed: the pruned trials stay PRUNED, off the front
        assert [t.state for t in study.trials[12:18]] == [state] * 6
        return out

    pruned = proposals(TrialState.PRUNED)
    assert pruned == proposals(TrialState.COMPLETE)
    assert pruned != proposals(TrialState.FAIL)


@pytest.mark.parametrize("backend", ["tpe", "gp"])
def test_pruned_trials_without_partial_scores_are_not_in_the_optimizers_data(backend) -> None:
    """A PRUNED trial with no partial scores for the study's objectives is ignored, like a failed one."""
    import numpy as np
    from optuna.distributions import FloatDistribution

    from mergesearch.search.optimizers import Optimizer

    dists = {"x": FloatDistribution(0.0, 1.0), "y": FloatDistribution(0.0, 1.0)}
    rng = np.random.default_rng(0)
    complete = [rng.random(2) for _ in range(12)]

    def proposals(state: TrialState) -> list[dict[str, float]]:
        study = optuna.create_study(directions=["maximize", "minimize"])
        study.set_user_attr("objective_names", ["f", "g"])
        for x, y in complete:
            study.add_trial(optuna.trial.create_trial(params={"x": x, "y": y}, distributions=dists,
                                                      values=[x + y, x * y]))
        for _ in range(6):
            study.add_trial(optuna.trial.create_trial(params={"x": 0.99, "y": 0.01}, distributions=dists,
                                                      state=state, user_attrs={"rungs": [{"n": 2, "values": {}}]}))
        opt = Optimizer(study, dists, name=backend, seed=3, options={"n_startup": 4})
        return [t.params for t in opt.ask(2)]

    assert proposals(TrialState.PRUNED) == proposals(TrialState.FAIL)
