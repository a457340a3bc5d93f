"""The hm3 layer-path policy: bounds, learning a known best path per preference, resume, suggest's inputs."""

from __future__ import annotations

import os

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from mergesearch.errors import ConfigError
from mergesearch.search.optimizers import Optimizer
from mergesearch.search.optimizers.hm3 import Bounds, HM3Sampler, Scale, simplex_points, validate_options
from mergesearch.search.study import open_study
from mergesearch.search.suggest import SUGGESTED_ATTR, preference_weights, propose, report

os.environ.setdefault("OMP_NUM_THREADS", "1")
optuna.logging.set_verbosity(optuna.logging.WARNING)

CHOICES = ["merged", "base", "a", "skip"]
FAST = {"n_startup": 6, "steps": 20, "update_steps": 3, "hidden": 16}


def space(slots: int, floats: bool = True) -> dict:
    d = {"w": FloatDistribution(0.0, 1.0)} if floats else {}
    return {**d, **{f"layer.{k}": CategoricalDistribution(CHOICES) for k in range(slots)}}


def path_of(params: dict) -> list[str]:
    return [params[f"layer.{k}"] for k in range(sum(k.startswith("layer.") for k in params))]


def counts(params: dict) -> list[float]:
    """Two maximised objectives: how many slots hold expert ``a``, how many hold ``base`` (plus w and 1 - w)."""
    p = path_of(params)
    w = params.get("w", 0.5)
    return [p.count("a") + 0.1 * w, p.count("base") + 0.1 * (1 - w)]


def test_decoded_paths_always_satisfy_the_layer_bounds():
    study = open_study("memory://", "s", [("a", "maximize"), ("b", "maximize")])
    opt = Optimizer(study, space(6), name="hm3", seed=0, options={**FAST, "min_layers": 2, "max_layers": 4})
    for _ in range(6):
        for t in opt.ask(3):
            opt.tell(t.number, counts(t.params))
    kept = [sum(c != "skip" for c in path_of(t.params)) for t in study.trials]
    assert len(kept) == 18 and all(2 <= k <= 4 for k in kept), kept
    # the objective rewards keeping slots: without the mask the policy would keep more than 4
    assert max(kept) == 4


def test_bounds_masks_reach_every_valid_count_and_nothing_else():
    b = Bounds(CHOICES, 5, 2, 3)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        kept = 0
        for k in range(5):
            c = int(rng.choice(np.flatnonzero(b.mask(k, kept))))
            kept += c != b.skip
        seen.add(kept)
    assert seen == {2, 3}
    np.testing.assert_array_equal(b.masks(0, np.array([0])), [b.mask(0, 0)])


def test_simplex_points_are_spread_preferences():
    w = simplex_points(16, 3, 0)
    assert w.shape == (16, 3) and np.allclose(w.sum(1), 1) and (w >= 0).all()
    assert np.ptp(w[:, 0]) > 0.5


def test_scale_measures_from_the_ideal_to_the_reference_and_inverts():
    F = np.array([[0.0, 10.0], [1.0, 5.0], [3.0, 40.0]])  # minimised; the front is the first two rows
    plain = Scale(F)(F)  # no reference: 1 = the front's worst (1 and 10); past it 1 + log
    np.testing.assert_allclose(plain, [[0.0, 1.0], [1.0, 0.0], [1 + np.log(3.0), 1 + np.log(7.0)]])
    scale = Scale(F, np.array([2.0, 4.0]))  # the second reference is better than the ideal: the front's spread
    g = scale(F)
    np.testing.assert_allclose(g[:, 0], [0.0, 0.5, 1 + np.log(1.5)])
    np.testing.assert_allclose(scale.raw(g), F)
    np.testing.assert_allclose(scale.pick_units(F), [[0.0, 1.0], [1.0, 0.0], [3.0, 7.0]])


def test_startup_paths_spread_the_number_of_kept_layers():
    sampler = HM3Sampler(space(8, floats=False), 0)
    sampler._last_bounds = Bounds(CHOICES, 8, 1, 8)
    rng = np.random.default_rng(0)
    kept = [sum(c != CHOICES.index("skip") for c in sampler.random_path(rng)) for _ in range(800)]
    counts = np.bincount(kept, minlength=9)[1:]
    # uniform over 1..8 (choices drawn uniformly per slot would keep 6 on average and rarely 3 or fewer)
    assert counts.min() > 60 and counts.max() < 140, counts


def test_startup_begins_with_the_start_points_each_once():
    starts = [{"w": 0.5, **{f"layer.{k}": c if k < 2 else "skip" for k in range(4)}} for c in ("merged", "base", "a")]
    study = open_study("memory://", "s", [("a", "maximize"), ("b", "maximize")])
    study.enqueue_trial(starts[1])  # stored already (e.g. a search.initial point): not proposed again
    opt = Optimizer(study, space(4), name="hm3", seed=0, options=FAST, start_points=starts)
    asked = [t.params for t in opt.ask(3)]
    assert asked == [starts[1], starts[0], starts[2]]
    later = [t.params for t in opt.ask(3)]
    assert all(p not in starts for p in later)  # the rest of the start-up design is drawn at random
    assert len({tuple(sorted(p.items())) for p in asked + later}) == 6


def test_min_layers_above_max_layers_is_one_line():
    with pytest.raises(ConfigError, match=r"min_layers \(5\) > max_layers \(2\)") as e:
        validate_options({"min_layers": 5, "max_layers": 2})
    assert "\n" not in str(e.value)


def _random_study(n: int, slots: int, seed: int) -> optuna.Study:
    study = open_study("memory://", "s", [("a", "maximize"), ("b", "maximize")])
    rng = np.random.default_rng(seed)
    dists = space(slots, floats=False)
    for _ in range(n):
        params = {k: CHOICES[int(rng.integers(4))] for k in dists}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=counts(params)))
    return study


def test_training_recovers_the_known_best_path_per_preference():
    """a-count vs base-count over 5 slots: all ``a`` is best for ω = (1, 0), all ``base`` for ω = (0, 1), and
    neither appears among the 40 random training paths (each has at most 4 of either)."""
    study = _random_study(40, 5, seed=1)
    best = {tuple(path_of(t.params)) for t in study.trials}
    assert ("a",) * 5 not in best and ("base",) * 5 not in best
    # kappa 0: the value model's mean, no pessimism (that keeps a measured plan unless a new one is surely
    # better; tested below): what training has learnt, not how cautious suggest is
    sampler = HM3Sampler(space(5, floats=False), 0, n_startup=10, steps=200, hidden=32, kappa=0.0)
    assert path_of(sampler.suggest(study, [1.0, 0.0])) == ["a"] * 5
    assert path_of(sampler.suggest(study, [0.0, 1.0])) == ["base"] * 5
    # the policy itself has learnt them, not only the search on its value that suggest adds
    greedy = sampler.decode(sampler.net, np.array([[1.0, 0.0], [0.0, 1.0]]), np.random.default_rng(0), greedy=True)
    assert [[CHOICES[c] for c in row] for row in greedy] == [["a"] * 5, ["base"] * 5]


def test_resume_reproduces_the_next_proposals(tmp_path):
    def first_batches(url: str) -> tuple[optuna.Study, Optimizer]:
        study = open_study(url, "s", [("a", "maximize"), ("b", "maximize")])
        opt = Optimizer(study, space(4), name="hm3", seed=3, options=FAST)
        for _ in range(4):
            for t in opt.ask(3):
                opt.tell(t.number, counts(t.params))
        return study, opt

    _, opt = first_batches(f"sqlite:///{tmp_path / 'a.db'}")
    same_process = [t.params for t in opt.ask(3)]
    url = f"sqlite:///{tmp_path / 'b.db'}"
    study_b, opt_b = first_batches(url)
    assert [t.params for t in study_b.trials] == [t.params for t in opt.study.trials][:12]
    del opt_b
    resumed = Optimizer(open_study(url, "s", [("a", "maximize"), ("b", "maximize")]), space(4), name="hm3", seed=3,
                        options=FAST)
    assert [t.params for t in resumed.ask(3)] == same_process
    other = Optimizer(open_study(f"sqlite:///{tmp_path / 'c.db'}", "s", [("a", "maximize"), ("b", "maximize")]),
                      space(4), name="hm3", seed=4, options=FAST)
    assert [t.params for t in other.ask(3)] != [t.params for t in opt.study.trials][:3]


def test_hm3_without_layers_is_one_line_naming_the_fix():
    study = open_study("memory://", "s", [("a", "maximize")])
    with pytest.raises(ConfigError, match=r"add space\.layers") as e:
        Optimizer(study, {"w": FloatDistribution(0, 1)}, name="hm3", seed=0, options={})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="layers") as e:
        propose(study, {"w": FloatDistribution(0, 1)}, {"a": 1.0}, seed=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("prefer", "match"), [
    ("bogus=1", "unknown objective 'bogus'"),
    ("a=-1", "'a' must be a finite number >= 0"),
    ({"a": -0.5, "b": 1}, "'a' must be a finite number >= 0"),
    ("a=0,b=0", "all weights are zero"),
    ("a", "expected OBJ=WEIGHT"),
])
def test_suggest_bad_preferences_are_one_line(prefer, match):
    with pytest.raises(ConfigError, match=match) as e:
        preference_weights(prefer, ["a", "b"])
    assert "\n" not in str(e.value)


def test_suggest_proposes_evaluates_and_ranks_on_the_front():
    study = _random_study(30, 4, seed=2)
    study.set_user_attr("objective_names", ["a", "b"])
    weights = preference_weights("a=2,b=1", ["a", "b"])
    assert weights == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    params = propose(study, space(4, floats=False), weights, seed=0, options={"steps": 150, "hidden": 32})
    dists = space(4, floats=False)
    study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=counts(params),
                                              user_attrs={SUGGESTED_ATTR: weights}))
    out = report(study, params, weights)
    assert out.trial == 30 and out.values == dict(zip(["a", "b"], counts(params), strict=True))
    # mostly ``a`` with some ``base`` is on the front of a 4-slot a-count/base-count problem
    assert out.on_front and out.rank is not None and out.rank <= max(1, out.front_size // 2), out.lines
    assert any("rank" in line for line in out.lines)


def test_suggest_rank_counts_a_trial_with_the_same_values_as_a_tie():
    study = _random_study(30, 4, seed=2)
    study.set_user_attr("objective_names", ["a", "b"])
    best = min(study.trials, key=lambda t: (-t.values[0], -t.values[1]))  # most a, then most base: on the front
    dists = space(4, floats=False)
    weights = {"a": 1.0, "b": 0.0}
    study.add_trial(optuna.trial.create_trial(params=best.params, distributions=dists, values=best.values,
                                              user_attrs={SUGGESTED_ATTR: weights}))
    out = report(study, best.params, weights)
    assert out.on_front and out.rank == 1, out.lines


@pytest.mark.parametrize(("prefer", "needle"), [("bogus=1", "unknown objective 'bogus'"),
                                                ("reverse=-1", "must be a finite number >= 0")])
def test_suggest_command_bad_preference_is_one_line(tiny_job, tmp_path, capsys, prefer, needle):
    from mergesearch.cli import main

    db = tmp_path / "s.db"
    with pytest.raises(SystemExit) as e:
        main(["suggest", str(tiny_job), "--prefer", prefer, "--storage", f"sqlite:///{db}", "--study", "s"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and needle in err[0]
    assert not db.exists()  # nothing stored


def test_value_model_is_sure_on_its_data_and_unsure_far_from_it():
    from mergesearch.search.optimizers.hm3 import ValueGP

    rng = np.random.default_rng(0)
    T = 6
    # training paths use choices 0 and 1 only; the objective counts them (one per column)
    paths = rng.integers(0, 2, (40, T))
    none = np.zeros((40, 0))
    G = np.stack([(paths == 0).mean(1), (paths == 1).mean(1)], 1)
    model = ValueGP(T, draws=8, seed=0).fit(paths, none, G)
    mu, sd = model.predict(paths, none)
    assert np.abs(mu - G).max() < 0.05
    unseen = rng.integers(2, 4, (40, T))  # choices never stored
    _, sd_far = model.predict(unseen, none)
    assert sd_far.mean() > 3 * sd.mean(), (sd_far.mean(), sd.mean())
    # the draws are the posterior's: their spread follows sd, and a refit on the same data draws the same
    draws = ValueGP(T, draws=4000, seed=0).fit(paths, none, G).draws(unseen, none)
    np.testing.assert_allclose(draws.std(0), sd_far, rtol=0.1)
    again = ValueGP(T, draws=8, seed=0).fit(paths, none, G)
    np.testing.assert_array_equal(again.draws(unseen, none), model.draws(unseen, none))


def test_value_model_predicts_a_constant_objective_exactly_and_warns_nothing():
    """A task every stored plan scores the same on (small subsets, early trials) has no signal variance: the fit
    must not take log(0), and it predicts that constant, surely, beside a varying objective it still learns."""
    import warnings

    from mergesearch.search.optimizers.hm3 import ValueGP

    rng = np.random.default_rng(2)
    T = 5
    paths, x = rng.integers(0, 3, (20, T)), rng.random((20, 1))
    G = np.stack([np.full(20, 0.25), (paths == 0).mean(1)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ValueGP(T, draws=4, seed=0).fit(paths, x, G)
        new = rng.integers(0, 3, (10, T)), rng.random((10, 1))
        mu, sd = model.predict(*new)
        draws = model.draws(*new)
    assert np.isfinite(mu).all() and np.isfinite(sd).all() and np.isfinite(draws).all()
    np.testing.assert_allclose(mu[:, 0], 0.25, atol=1e-9)
    assert sd[:, 0].max() < 1e-6 < sd[:, 1].min()
    np.testing.assert_allclose(model.predict(paths, x)[0][:, 1], G[:, 1], atol=0.05)


def test_value_model_generalises_what_adds_up_over_slots():
    """An objective that is a sum of per-slot costs (a layer's own cost) plus a non-layer term: fitted on 60
    paths, it predicts 200 paths never stored within 15 % of the objective's spread, and the noise-free data
    are interpolated."""
    from mergesearch.search.optimizers.hm3 import ValueGP

    rng = np.random.default_rng(1)
    T, C = 8, 4
    cost = rng.random((T, C))

    def plans(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        paths, x = rng.integers(0, C, (n, T)), rng.random((n, 2))
        return paths, x, cost[np.arange(T), paths].sum(1) + 0.5 * x[:, 0]

    paths, x, y = plans(60)
    model = ValueGP(T, draws=1, seed=0).fit(paths, x, y[:, None])
    test, tx, truth = plans(200)
    assert not {tuple(p) for p in test} & {tuple(p) for p in paths}
    mu, _ = model.predict(test, tx)
    assert np.abs(mu[:, 0] - truth).mean() < 0.15 * truth.std(), (np.abs(mu[:, 0] - truth).mean(), truth.std())
    np.testing.assert_allclose(model.predict(paths, x)[0][:, 0], y, atol=0.02)


def test_suggest_keeps_the_best_stored_plan_when_nothing_new_is_surely_better():
    """With a huge pessimism (kappa) no new plan's predicted value can beat a measured one: suggest proposes the
    stored trial best under the preference (by pick's ASF) again; with kappa 0 it may propose a new plan."""
    from mergesearch.search.optimizers.hm3 import Scale, pick_asf

    study = _random_study(30, 4, seed=2)
    F = -np.array([t.values for t in study.trials])
    w = np.array([0.7, 0.3])
    best = study.trials[int(np.argmin(pick_asf(Scale(F).pick_units(F), w)))]
    sure = HM3Sampler(space(4, floats=False), 0, steps=30, hidden=16, kappa=10.0)
    assert sure.suggest(study, w) == best.params
    # for (1, 0) the best plan (every slot `a`) is not stored: without pessimism suggest proposes it
    assert ("a",) * 4 not in {tuple(path_of(t.params)) for t in study.trials}
    bold = HM3Sampler(space(4, floats=False), 0, steps=30, hidden=16, kappa=0.0)
    assert path_of(bold.suggest(study, [1.0, 0.0])) == ["a"] * 4


def test_ask_with_the_value_model_proposes_new_plans_within_bounds():
    study = open_study("memory://", "s", [("a", "maximize"), ("b", "maximize")])
    opt = Optimizer(study, space(5), name="hm3", seed=1, options={**FAST, "min_layers": 2, "max_layers": 4,
                                                                  "value_draws": 3})
    for _ in range(8):
        for t in opt.ask(2):
            opt.tell(t.number, counts(t.params))
    keys = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(keys)) == len(keys) == 16
    assert all(2 <= sum(c != "skip" for c in path_of(t.params)) <= 4 for t in study.trials)
    assert not any("proposal_fallback" in t.user_attrs for t in study.trials)


def test_paths_without_a_merged_slot_are_one_plan_whatever_the_recipe():
    """Two slots: 8 paths keep no merged slot, and for them the recipe (``weight.0``) changes nothing, as in a
    real layer space: hm3 never proposes such a path again with another weight."""
    def score(params: dict) -> list[float]:
        p = path_of(params)
        w = params["weight.0"] if "merged" in p else 0.0
        return [p.count("a") + 0.5 * w, p.count("base") + 0.5 * (1 - w) * ("merged" in p)]

    dists = {"weight.0": FloatDistribution(0.0, 1.0), **{f"layer.{k}": CategoricalDistribution(CHOICES)
                                                         for k in range(2)}}
    study = open_study("memory://", "s", [("a", "maximize"), ("b", "maximize")])
    opt = Optimizer(study, dists, name="hm3", seed=0, options={**FAST, "value_draws": 4})
    for _ in range(9):
        for t in opt.ask(2):
            opt.tell(t.number, score(t.params))
    plain = [tuple(path_of(t.params)) for t in study.trials if "merged" not in path_of(t.params)]
    assert len(plain) == len(set(plain)) and len(plain) >= 4
