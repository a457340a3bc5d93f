"""Conformance suite: every optimizer backend on a cheap mixed 2-objective problem (ZDT1, 4 floats + int + cat)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mergesearch.errors import ConfigError
from mergesearch.search.optimizers import OPTIMIZERS, BatchSampler, Optimizer
from mergesearch.search.optimizers.base import FALLBACK_ATTR
from mergesearch.search.study import open_study

os.environ.setdefault("OMP_NUM_THREADS", "1")
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", category=UserWarning)

SPACE = {
    **{f"x{i}": FloatDistribution(0.0, 1.0) for i in range(4)},
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "k": IntDistribution(0, 5),
    "c": CategoricalDistribution(["a", "b", "c"]),
}
#: hm3 searches layer paths: its conformance space adds four layer slots to the same problem
LAYER_SPACE = {**SPACE, **{f"layer.{k}": CategoricalDistribution(["merged", "base", "skip"]) for k in range(4)}}
OBJECTIVES = [("f1", "minimize"), ("f2", "minimize")]
# small populations and a capped GP so the whole suite stays fast
CHEAP = {
    "random": {},
    "tpe": {"n_startup": 4},
    "gp": {"n_startup": 10},
    "nsga2": {"pop_size": 4},
    "nsga3": {"pop_size": 4},
    "qnehvi": {"n_startup": 8, "fit_maxiter": 20, "num_restarts": 1, "raw_samples": 16, "mc_samples": 16},
    "pymoo-nsga3": {"pop_size": 4},
    "pymoo-smsemoa": {"pop_size": 4},
    "cmaes-sum": {"popsize": 4},
    "hm3": {"n_startup": 4, "steps": 10, "update_steps": 2, "hidden": 16},
}
BACKENDS = sorted(OPTIMIZERS)


def zdt1(p: dict) -> list[float]:
    """ZDT1 over the unit-cube image of the params: f1 = x0, f2 = g·(1 − sqrt(x0/g)); layer slots (hm3's
    space) add to g: 0 for ``base``, 0.5 for ``merged``, 1 for ``skip`` (the same weight as one float)."""
    x = [p[f"x{i}"] for i in range(4)] + [(np.log10(p["lr"]) + 4) / 3, p["k"] / 5, "abc".index(p["c"]) / 2]
    x += [["base", "merged", "skip"].index(p[k]) / 2 for k in sorted(p) if k.startswith("layer.")]
    x = np.array(x)
    g = 1 + 9 * x[1:].mean()
    return [float(x[0]), float(g * (1 - np.sqrt(x[0] / g)))]


def space_of(name: str) -> dict:
    return LAYER_SPACE if name == "hm3" else SPACE


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def make(name: str, storage: str = "memory://", seed: int = 0) -> tuple[optuna.Study, Optimizer]:
    study = open_study(storage, "s", OBJECTIVES)
    return study, Optimizer(study, space_of(name), name=name, seed=seed, options=CHEAP[name])


def valid(params: dict) -> bool:
    space = LAYER_SPACE if any(k.startswith("layer.") for k in params) else SPACE
    return set(params) == set(space) and all(d._contains(d.to_internal_repr(params[k])) for k, d in space.items())


def fell_back(study: optuna.Study) -> list[int]:
    """Numbers of the trials a batch backend left to random sampling (its proposal raised or came up short)."""
    return [t.number for t in study.get_trials(deepcopy=False) if FALLBACK_ATTR in t.user_attrs]


def check_backend(name: str) -> None:
    """The conformance run of one backend: asks and tells past its start-up, two idle workers, no trial left to
    the random fallback (a backend whose proposals always fail would otherwise pass as random search)."""
    study, opt = make(name)
    for _ in range(8):
        trials = opt.ask(2)
        assert all(valid(t.params) for t in trials)
        for t in trials:
            opt.tell(t.number, zdt1(t.params))
    assert not fell_back(study), f"{name}: trials {fell_back(study)} fell back to random sampling"


def test_cheap_options_cover_every_backend():
    assert set(CHEAP) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", BACKENDS)
def test_ask_tell_batches_failures_and_async(name):
    study, opt = make(name)
    for n in (1, 2, 3):  # idle workers
        trials = opt.ask(n)
        assert len(trials) == n
        assert all(valid(t.params) for t in trials)
        assert len({key(t.params) for t in trials}) == n
        for t in trials:
            opt.tell(t.number, zdt1(t.params))
    bad = opt.ask(2)
    opt.tell(bad[0].number, None, error="out of memory")
    opt.tell(bad[1].number, [float("nan"), 1.0])
    # async: keep two trials running while asking more (past the start-up phase of every backend)
    running = opt.ask(2)
    for _ in range(3):
        new = opt.ask(2)  # asked while two trials are still being evaluated
        assert all(valid(t.params) for t in new)
        assert not {key(t.params) for t in new} & {key(t.params) for t in running}
        for t in running:
            opt.tell(t.number, zdt1(t.params))
        running = new
    for t in running:
        opt.tell(t.number, zdt1(t.params))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states.count(TrialState.FAIL) == 2 and TrialState.RUNNING not in states
    opt.tell(bad[0].number, [0.0, 0.0])  # a late report for a finished trial changes nothing
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert failed[0].user_attrs["fail_reason"] == "out of memory"
    assert "non-finite" in failed[1].user_attrs["fail_reason"]
    assert len(study.trials) == 16


@pytest.mark.parametrize("name", BACKENDS)
def test_same_seed_same_first_asks(name):
    runs = []
    for _ in range(2):
        _, opt = make(name, seed=7)
        first = opt.ask(3)
        for t in first:
            opt.tell(t.number, zdt1(t.params))
        runs.append([key(t.params) for t in first] + [key(t.params) for t in opt.ask(2)])
    assert runs[0] == runs[1]
    _, other = make(name, seed=8)
    assert [key(t.params) for t in other.ask(3)] != runs[0][:3]


@pytest.mark.parametrize("name", BACKENDS)
def test_enqueued_points_served_first(name):
    _, opt = make(name)
    p1 = {"x0": 0.5, "x1": 0.0, "x2": 0.0, "x3": 0.0, "lr": 1e-3, "k": 0, "c": "a"}
    if name == "hm3":
        p1.update({f"layer.{k}": "base" for k in range(4)})
    p2 = {"x0": 0.1, "k": 5}  # partial: the rest is sampled
    opt.enqueue(p1)
    opt.enqueue(p2)
    trials = opt.ask(3)
    assert trials[0].params == p1
    assert {k: trials[1].params[k] for k in p2} == p2 and valid(trials[1].params)
    assert valid(trials[2].params)
    for t in trials:
        opt.tell(t.number, zdt1(t.params))
    assert all(valid(t.params) for t in opt.ask(2))


@pytest.mark.parametrize("name", ["tpe", "gp", "nsga2"])
def test_refinements_do_not_ask_a_model_backend(name, monkeypatch):
    _, opt = make(name)
    calls = []
    real = opt.sampler.sample_relative
    monkeypatch.setattr(opt.sampler, "sample_relative", lambda *a: calls.append(1) or real(*a))
    point = {"x0": 0.5, "x1": 0.0, "x2": 0.0, "x3": 0.0, "lr": 1e-3, "k": 0, "c": "a"}
    opt.enqueue(point, {"refine_of": 0})
    opt.enqueue(point)  # a plain enqueued point still reaches the sampler
    first, second = opt.ask(2)
    assert first.params == second.params == point and first.user_attrs["refine_of"] == 0
    # genetic samplers count every trial into a generation in sample_relative, refinements included
    assert len(calls) == (2 if name == "nsga2" else 1)


@pytest.mark.parametrize("name", BACKENDS)
def test_resume_from_sqlite(name, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    study, opt = make(name, url)
    for _ in range(2):
        for t in opt.ask(2):
            opt.tell(t.number, zdt1(t.params))
    done = {key(t.params) for t in study.trials}
    del study, opt
    _, opt = make(name, url)  # a fresh process would do exactly this
    trials = opt.ask(3)
    assert [t.number for t in trials] == [4, 5, 6]
    assert not done & {key(t.params) for t in trials}
    assert all(valid(t.params) for t in trials)


@pytest.mark.parametrize("name", BACKENDS)
def test_proposals_do_not_fall_back(name):
    check_backend(name)


class Broken(BatchSampler):
    def propose(self, study, n):
        raise RuntimeError("singular matrix")


def test_failed_proposal_falls_back_to_random_and_says_so():
    study, opt = make("random")
    opt.sampler = opt.study.sampler = Broken(SPACE, 0)
    trials = opt.ask(2)
    assert all(valid(t.params) for t in trials) and len({key(t.params) for t in trials}) == 2
    stored = study.get_trials(deepcopy=False)
    assert [t.user_attrs[FALLBACK_ATTR] for t in stored] == ["random (RuntimeError: singular matrix)"] * 2


def test_conformance_fails_for_a_backend_that_always_falls_back(monkeypatch):
    from mergesearch.search import optimizers

    monkeypatch.setitem(optimizers.OPTIMIZERS, "broken", (lambda c: Broken(c.distributions, c.seed), frozenset()))
    monkeypatch.setitem(CHEAP, "broken", {})
    with pytest.raises(AssertionError, match="fell back to random"):
        check_backend("broken")

    class Empty(BatchSampler):  # proposes nothing: every trial is random
        def propose(self, study, n):
            return []

    monkeypatch.setitem(optimizers.OPTIMIZERS, "broken", (lambda c: Empty(c.distributions, c.seed), frozenset()))
    with pytest.raises(AssertionError, match="fell back to random"):
        check_backend("broken")


def test_unknown_optimizer_lists_known_names():
    study = open_study("memory://", "s", OBJECTIVES)
    with pytest.raises(ConfigError, match=r"unknown optimizer 'bogus'.*qnehvi"):
        Optimizer(study, SPACE, name="bogus", seed=0, options={})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("nsga2", {"popsize": 4}, "unknown option.*popsize.*accepted: pop_size"),
        ("random", {"pop_size": 4}, "accepted: none"),
        ("nsga2", {"pop_size": 1}, "pop_size"),
        ("qnehvi", {"n_startup": "x"}, "n_startup"),
        ("cmaes-sum", {"weights": [1.0]}, "weights"),
        ("cmaes-sum", {"weights": [1.0, -1.0]}, "weights"),
        ("cmaes-sum", {"sigma0": 2}, "sigma0"),
    ],
)
def test_bad_options(name, options, match):
    study = open_study("memory://", "s", OBJECTIVES)
    with pytest.raises(ConfigError, match=match):
        Optimizer(study, SPACE, name=name, seed=0, options=options)


def test_bad_inputs():
    study = open_study("memory://", "s", OBJECTIVES)
    with pytest.raises(ConfigError, match="empty"):
        Optimizer(study, {}, name="tpe", seed=0, options={})
    with pytest.raises(ConfigError, match="reference point"):
        Optimizer(study, SPACE, name="qnehvi", seed=0, options={}, reference_point=[1.0])
    opt = Optimizer(study, SPACE, name="tpe", seed=0, options={})
    with pytest.raises(ConfigError, match="unknown parameter 'nope'"):
        opt.enqueue({"nope": 1})
    with pytest.raises(ConfigError, match="k=9"):
        opt.enqueue({"k": 9})
    with pytest.raises(ConfigError, match="c='z'"):
        opt.enqueue({"c": "z"})
    assert study.get_trials(deepcopy=False) == []


def test_cmaes_sum_weights_steer_the_search():
    """All weight on f1 (= x0): after a few generations CMA-ES samples x0 near 0."""
    study = open_study("memory://", "s", OBJECTIVES)
    opt = Optimizer(study, SPACE, name="cmaes-sum", seed=0, options={"weights": [1.0, 0.0], "popsize": 6})
    for _ in range(8):
        for t in opt.ask(6):
            opt.tell(t.number, zdt1(t.params))
    last = [t.params["x0"] for t in opt.ask(6)]
    assert np.mean(last) < 0.2


def test_qnehvi_fitted_units_closed_form():
    from mergesearch.search.optimizers.qnehvi import fitted_units

    dirs = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    # minimisation form: maximised accuracy a is stored as -a; loss l as l. a = 0.2, 0.6; l = 1, 3.
    F = np.array([[-0.2, 1.0], [-0.6, 3.0]])
    Yn, ref = fitted_units(F, dirs, np.array([0.0, 5.0]))  # worst acceptable: a = 0, l = 5
    s = np.sqrt(2.0)  # sample stds (ddof=1): std(a) = 0.2·√2, std(-l) = √2
    np.testing.assert_allclose(Yn, [[-1 / s, 1 / s], [1 / s, -1 / s]])
    np.testing.assert_allclose(ref, [(0.0 - 0.4) / (0.2 * s), (-5.0 + 2.0) / s])
    Yn, ref = fitted_units(F, dirs, None)
    assert np.all(ref < Yn.min(0))


def test_qnehvi_with_reference_point_and_maximisation():
    study = open_study("memory://", "s", [("g1", "maximize"), ("f2", "minimize")])
    opt = Optimizer(
        study, SPACE, name="qnehvi", seed=0, options={**CHEAP["qnehvi"], "n_startup": 4}, reference_point=[-1.1, 11.0]
    )
    for _ in range(3):
        for t in opt.ask(2):
            f1, f2 = zdt1(t.params)
            opt.tell(t.number, [-f1, f2])
    trials = opt.ask(2)
    assert all(valid(t.params) for t in trials) and len({key(t.params) for t in trials}) == 2


def test_qnehvi_never_compiles_botorchs_fused_kernel(monkeypatch):
    """BoTorch 0.18 JIT-compiles a C++ kernel on a process's first qLogNEHVI (30-60 s, a compiler in the driver, a
    CPU-specific binary in the home directory): a qnehvi ask must not start that build."""
    import torch.utils.cpp_extension
    from botorch.acquisition.multi_objective import logei

    builds: list[str] = []
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda name, *a, **k: builds.append(name))
    monkeypatch.setattr(logei, "_load_attempted", False)  # as in a fresh process
    monkeypatch.setattr(logei, "_C", None)
    study = open_study("memory://", "s", [("f1", "minimize"), ("f2", "minimize")])
    opt = Optimizer(study, SPACE, name="qnehvi", seed=0, options={**CHEAP["qnehvi"], "n_startup": 4})
    for _ in range(3):
        for t in opt.ask(2):
            opt.tell(t.number, list(zdt1(t.params)))
    assert not any(FALLBACK_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False))  # the model proposed
    assert builds == [] and logei._C is None


def _hv(study: optuna.Study) -> float:
    from pymoo.indicators.hv import HV

    F = np.array([t.values for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))])
    return float(HV(ref_point=np.array([1.1, 11.0]))(F))


def test_quality_beats_random():
    """On ZDT1 with 40 evaluations, TPE and SMS-EMOA reach more hypervolume than Sobol (mean of 3 seeds)."""
    hv: dict[str, float] = {}
    for name in ("random", "tpe", "pymoo-smsemoa"):
        vals = []
        for seed in range(3):
            study = open_study("memory://", "s", OBJECTIVES)
            opt = Optimizer(
                study, SPACE, name=name, seed=seed, options={"pop_size": 8} if name == "pymoo-smsemoa" else {}
            )
            for _ in range(20):
                for t in opt.ask(2):
                    opt.tell(t.number, zdt1(t.params))
            vals.append(_hv(study))
        hv[name] = float(np.mean(vals))
    assert hv["tpe"] > hv["random"], hv
    assert hv["pymoo-smsemoa"] > hv["random"], hv
