"""SharedFitTPESampler: Optuna's TPE draw for draw (one trial at a time and several running, with and without the
constant liar), with the split and the good-trials estimators made once per history instead of per parameter."""

from __future__ import annotations

import math
from typing import ClassVar

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mergesearch.search.optimizers import Optimizer
from mergesearch.search.optimizers import tpe as tpe_module
from mergesearch.search.optimizers.tpe import SharedFitTPESampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "w0": FloatDistribution(0.0, 1.0),
    "w1": FloatDistribution(1e-3, 1.0, log=True),
    "d": FloatDistribution(0.1, 1.0, step=0.1),
    "k": IntDistribution(1, 9),
    "m": CategoricalDistribution(["ties", "dare", "linear"]),
}


def _values(p: dict) -> list[float]:
    """Two conflicting objectives (both minimised) of a parameter set."""
    cat = {"ties": 0.0, "dare": 0.3, "linear": 0.7}[p["m"]]
    a = (p["w0"] - 0.3) ** 2 + math.log(p["w1"]) ** 2 / 50 + cat + p["k"] / 30
    b = (p["w0"] - 0.8) ** 2 + p["d"] + (9 - p["k"]) / 30
    return [a, b]


def _drive(sampler: optuna.samplers.BaseSampler, rounds: int, parallel: int) -> list[dict]:
    """``rounds`` times: ask ``parallel`` trials (the later ones see the earlier as RUNNING), then tell them;
    every 7th trial pruned and every 11th failed."""
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    out = []
    for _ in range(rounds):
        asked = [study.ask(SPACE) for _ in range(parallel)]
        for trial in asked:
            out.append(dict(trial.params))
            if trial.number % 11 == 10:
                study.tell(trial, state=TrialState.FAIL)
            elif trial.number % 7 == 6:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, _values(trial.params))
    return out


@pytest.mark.parametrize("constant_liar", [True, False])
@pytest.mark.parametrize("parallel", [1, 4])
def test_proposals_are_optunas_tpe_draw_for_draw(constant_liar: bool, parallel: int) -> None:
    kw = {"seed": 3, "n_startup_trials": 5, "constant_liar": constant_liar}
    ours = _drive(SharedFitTPESampler(**kw), 40 // parallel, parallel)
    theirs = _drive(optuna.samplers.TPESampler(**kw), 40 // parallel, parallel)
    assert ours == theirs


class _Counting(SharedFitTPESampler):
    """Counts the Parzen estimators built, good and bad."""

    built: ClassVar[dict[bool, int]] = {True: 0, False: 0}

    def _build_parzen_estimator(self, study, search_space, trials, handle_below):  # type: ignore[no-untyped-def]
        type(self).built[handle_below] += 1
        return super()._build_parzen_estimator(study, search_space, trials, handle_below)


def test_split_and_good_estimators_are_made_once_per_history(monkeypatch: pytest.MonkeyPatch) -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    opt = Optimizer(study, SPACE, name="tpe", seed=0, options={"n_startup": 5})
    assert isinstance(opt.sampler, SharedFitTPESampler)
    for trial in opt.ask(20):
        opt.tell(trial.number, _values(trial.params))
    splits = []
    real_split = tpe_module._split_trials
    monkeypatch.setattr(tpe_module, "_split_trials", lambda *a: splits.append(1) or real_split(*a))
    opt.sampler.__class__ = _Counting
    _Counting.built = {True: 0, False: 0}

    batch = opt.ask(4)
    assert len(splits) == 1  # Optuna: once per parameter and trial (20)
    assert _Counting.built == {True: len(SPACE), False: 4 * len(SPACE)}  # Optuna: 20 and 20
    assert len({t.params["w0"] for t in batch}) == 4

    opt.tell(batch[0].number, _values(batch[0].params))  # a result: the next trial refits
    opt.ask(1)
    assert len(splits) == 2 and _Counting.built == {True: 2 * len(SPACE), False: 5 * len(SPACE)}


def test_a_changed_optuna_falls_back_to_optunas_tpe(monkeypatch: pytest.MonkeyPatch) -> None:
    def drifted(study, trials, n_below, constraints_enabled):  # another signature
        raise AssertionError("not reached")

    monkeypatch.setattr(tpe_module, "_split_trials", drifted)
    monkeypatch.setattr(tpe_module, "_DRIFT", [])
    ours = _drive(SharedFitTPESampler(seed=3, n_startup_trials=5), 25, 1)
    theirs = _drive(optuna.samplers.TPESampler(seed=3, n_startup_trials=5), 25, 1)
    assert ours == theirs
    assert tpe_module._DRIFT and "TypeError" in tpe_module._DRIFT[0]


def test_one_sampler_over_two_studies_in_turn() -> None:
    """Two studies (both study id 0, in their own storages) at the same trial numbers never share a fit."""

    def in_turn(sampler: optuna.samplers.BaseSampler) -> list[dict]:
        a, b = (optuna.create_study(directions=["minimize", "minimize"], sampler=sampler) for _ in range(2))
        out = []
        for _ in range(24):
            for study, flip in ((a, 1.0), (b, -1.0)):
                trial = study.ask(SPACE)
                out.append(dict(trial.params))
                study.tell(trial, [flip * v for v in _values(trial.params)])
        return out

    kw = {"seed": 4, "n_startup_trials": 5}
    assert in_turn(SharedFitTPESampler(**kw)) == in_turn(optuna.samplers.TPESampler(**kw))
