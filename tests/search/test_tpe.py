"""SharedFitTPESampler: Optuna's TPE draw for draw (one trial at a time and several running, with and without the
constant liar), with the split and the good-trials estimators made once per history instead of per parameter and
a trial's continuous parameters sampled as one stack."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers._tpe import _truncnorm
from optuna.trial import TrialState

from mergesearch.search.optimizers import Optimizer
from mergesearch.search.optimizers import tpe as tpe_module
from mergesearch.search.optimizers.normal_cdf import log_ndtr
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
    """Counts the Parzen estimators built, good and bad: one parameter's, and stacks of continuous ones."""

    built: ClassVar[dict[bool, int]] = {True: 0, False: 0}
    stacked: ClassVar[dict[bool, int]] = {True: 0, False: 0}

    def _build_parzen_estimator(self, study, search_space, trials, handle_below):  # type: ignore[no-untyped-def]
        type(self).built[handle_below] += 1
        return super()._build_parzen_estimator(study, search_space, trials, handle_below)

    def _fit(self, dists, obs, *, below, multi):  # type: ignore[no-untyped-def]
        type(self).stacked[below] += 1
        return super()._fit(dists, obs, below=below, multi=multi)


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
    _Counting.built, _Counting.stacked = {True: 0, False: 0}, {True: 0, False: 0}

    batch = opt.ask(4)
    assert len(splits) == 1  # Optuna: once per parameter and trial (20)
    # w0 and w1 (continuous) as one stack, d, k and m one by one; Optuna: 20 good and 20 bad estimators
    assert _Counting.stacked == {True: 1, False: 4} and _Counting.built == {True: 3, False: 4 * 3}
    assert len({t.params["w0"] for t in batch}) == 4

    opt.tell(batch[0].number, _values(batch[0].params))  # a result: the next trial refits
    opt.ask(1)
    assert len(splits) == 2
    assert _Counting.stacked == {True: 2, False: 5} and _Counting.built == {True: 6, False: 5 * 3}


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


WIDE = {f"w{i}": FloatDistribution(0.0, 1.0 + i, log=False) if i % 3 else FloatDistribution(1e-3, 2.0 + i, log=True)
        for i in range(12)}
WIDE["m"] = CategoricalDistribution(["ties", "dare", "linear"])  # in the middle: the draws keep their order
WIDE.update({f"v{i}": FloatDistribution(-1.0, 1.0) for i in range(12)})


def _drive_wide(sampler: optuna.samplers.BaseSampler, parallel: int) -> list[dict]:
    """A per-layer-like space (24 continuous parameters) plus ``density``, asked only for ties (so some trials lack
    it); four objectives; every 7th trial pruned; after 20 trials one with two values given (enqueued)."""
    study = optuna.create_study(directions=["minimize"] * 4, sampler=sampler)
    out = []
    for r in range(48 // parallel):
        if r == 20 // parallel:
            study.enqueue_trial({"w1": 0.5, "v3": -0.25})
        asked = []
        for _ in range(parallel):
            trial = study.ask(WIDE)
            if trial.params["m"] == "ties":
                trial.suggest_float("density", 0.1, 1.0)
            asked.append(trial)
        for trial in asked:
            p = trial.params
            out.append(dict(p))
            if trial.number % 7 == 6:
                study.tell(trial, state=TrialState.PRUNED)
                continue
            w = [p[f"w{i}"] / (1.0 + i) for i in range(12)]
            v = [p[f"v{i}"] for i in range(12)]
            study.tell(trial, [sum((x - 0.3) ** 2 for x in w), sum((x - 0.7) ** 2 for x in w) + p.get("density", 0.5),
                               sum(x * x for x in v), sum((x + 0.5) ** 2 for x in v[:6])])
    return out


@pytest.mark.parametrize(("constant_liar", "parallel"), [(True, 4), (False, 1)])
def test_continuous_parameters_sampled_as_one_stack_are_optunas_draw_for_draw(constant_liar: bool,
                                                                              parallel: int) -> None:
    kw = {"seed": 7, "n_startup_trials": 8, "constant_liar": constant_liar}
    _Counting.stacked = {True: 0, False: 0}
    ours = _drive_wide(_Counting(**kw), parallel)
    assert _Counting.stacked[False] == 48 - 8  # every trial after the start-up sampled its 24 as one stack
    assert ours == _drive_wide(optuna.samplers.TPESampler(**kw), parallel)


def test_compiled_log_ndtr_is_optunas_bit_for_bit() -> None:
    """Every branch of ``_log_ndtr_single`` (right tail, middle, the asymptotic series below -20) and the
    boundaries; the series squares with the C library's pow, as Python does (``a * a`` differs here)."""
    rng = np.random.default_rng(0)
    a = np.concatenate([rng.normal(0.0, 4.0, 20_000), rng.uniform(-200.0, -20.0, 60_000),
                        [-20.0, np.nextafter(-20.0, -21.0), 6.0, np.nextafter(6.0, 7.0), 0.0, -0.0, -1e10, 1e10]])
    theirs = _truncnorm._log_ndtr(a)
    ours = log_ndtr(a.reshape(2, -1)).reshape(-1)  # any shape
    assert ours.tobytes() == theirs.tobytes()
