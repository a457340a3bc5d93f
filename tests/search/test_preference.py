"""Picking a trial by preference on hand-built fronts whose answers are known."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from mergesearch.errors import ConfigError, MergeSearchError
from mergesearch.search.pareto import Front, load_front
from mergesearch.search.preference import parse_minimums, parse_prefer, pick

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# An L-shaped convex front (both minimised, already in [0, 1]) with one obvious elbow at index 3.
ELBOW = np.array([[0, 1], [0.02, 0.6], [0.05, 0.3], [0.1, 0.1], [0.3, 0.05], [0.6, 0.02], [1, 0]], dtype=float)
MINMIN = [("x", "minimize"), ("y", "minimize")]


def mixed_front() -> Front:
    """acc maximised, cost minimised: acc = sqrt(cost) on 11 points, trial numbers = row index."""
    cost = np.linspace(0.0, 1.0, 11)
    return Front.from_values(np.c_[np.sqrt(cost), cost], [("acc", "maximize"), ("cost", "minimize")])


def test_extreme_weights_choose_extremes() -> None:
    front = mixed_front()
    assert pick(front, {"acc": 1, "cost": 0}).trial.number == 10  # best accuracy
    assert pick(front, {"acc": 0, "cost": 1}).trial.number == 0  # cheapest
    assert pick(front, {"cost": 5}).trial.number == 0  # unnamed objectives weigh 0
    for method in ("asf", "pseudo-weights"):
        assert pick(front, {"acc": 1, "cost": 0}, method=method).trial.number == 10
        assert pick(front, {"acc": 0, "cost": 1}, method=method).trial.number == 0


def test_extremes_three_objectives() -> None:
    rng = np.random.default_rng(0)
    v = rng.random((60, 3))
    objectives = [("a", "maximize"), ("b", "minimize"), ("c", "maximize")]
    front = Front.from_values(v, objectives)
    assert pick(front, {"a": 1}).trial.values["a"] == pytest.approx(v[:, 0].max())
    assert pick(front, {"b": 1}).trial.values["b"] == pytest.approx(v[:, 1].min())
    assert pick(front, {"c": 1}, method="pseudo-weights").trial.values["c"] == pytest.approx(v[:, 2].max())


def test_asf_rank_and_runner_up_by_hand() -> None:
    # equal weights (0.5 each): ASF = 0.5 * max(x, y). Point 2 moved to (0.05, 0.25) so no two scores tie:
    # 3 → 0.05, 2 → 0.125, 4 → 0.15, then 1 and 5 (0.3), 0 and 6 (0.5).
    v = ELBOW.copy()
    v[2] = [0.05, 0.25]
    p = pick((v, MINMIN), {"x": 1, "y": 1})
    assert [t.number for t in p.ranking][:3] == [3, 2, 4]
    assert {t.number for t in p.ranking[3:5]} == {1, 5} and {t.number for t in p.ranking[5:]} == {0, 6}
    assert p.trial.number == 3 and p.rank == 1 and p.runner_up.number == 2
    assert p.scores[:3] == pytest.approx([0.05, 0.125, 0.15])
    assert p.n_candidates == 7 and p.weights == pytest.approx({"x": 0.5, "y": 0.5})
    text = "\n".join(p.explanation)
    assert "chose trial 3: x=0.1, y=0.1" in text and "runner-up: trial 2" in text and "rank 1 of 7" in text


def test_weights_shift_the_choice() -> None:
    # ASF with weights w minimises max(w_x x, w_y y): favouring x moves the pick towards small x
    # w = (10/11, 1/11): point 2 scores max(0.045, 0.027) = 0.045, point 1 0.055, point 3 0.091
    assert pick((ELBOW, MINMIN), {"x": 1, "y": 0.1}).trial.number == 2
    assert pick((ELBOW, MINMIN), {"x": 0.1, "y": 1}).trial.number == 4


def test_minimums_exclude_points() -> None:
    front = mixed_front()
    p = pick(front, {"acc": 0, "cost": 1}, minimums={"acc": 0.7})  # cheapest with acc >= 0.7: cost 0.5 (0.707)
    assert p.trial.number == 5
    assert all(t.values["acc"] >= 0.7 for t in p.ranking) and p.n_candidates == 6
    p = pick(front, {"acc": 1}, minimums={"cost": 0.35})  # best acc with cost <= 0.35
    assert p.trial.number == 3
    assert any("excluded 7 of 11" in line for line in p.explanation)


def test_minimums_none_feasible_name_the_constraint() -> None:
    front = mixed_front()
    msg = r"--min acc=1.5: no front trial has acc >= 1.5 \(best on the front: 1\)"
    with pytest.raises(MergeSearchError, match=msg):
        pick(front, {"acc": 1}, minimums={"acc": 1.5})
    with pytest.raises(MergeSearchError, match=r"no front trial meets all of acc=0.9, cost=0.2 together"):
        pick(front, {"acc": 1}, minimums={"acc": 0.9, "cost": 0.2})


def test_knee_of_known_curves() -> None:
    assert pick((ELBOW, MINMIN), method="knee").trial.number == 3
    # y = (1 - sqrt(x))^2 is convex; the point farthest beyond the chord x + y = 1 is x = 0.25 (index 5 of 21)
    x = np.linspace(0.0, 1.0, 21)
    curve = np.c_[x, (1 - np.sqrt(x)) ** 2]
    assert pick((curve, MINMIN), method="knee").trial.number == 5
    # same curve as maximisation of (1 - x): directions are respected
    assert pick((np.c_[1 - x, curve[:, 1]], [("a", "maximize"), ("y", "minimize")]), method="knee").trial.number == 5


def test_knee_prefers_pymoo_high_tradeoff_over_smallest_sum() -> None:
    # point 3 has the smallest normalised sum, but pymoo's local trade-off measure singles out point 6
    v = np.array([[0, 1], [0.02, 0.8], [0.04, 0.6], [0.06, 0.4], [0.3, 0.38], [0.35, 0.2], [0.4, 0.12],
                  [0.5, 0.08], [0.7, 0.04], [1, 0]])
    p = pick((v, MINMIN), method="knee")
    assert p.trial.number == 6 and p.runner_up.number == 3
    assert any("high trade-off point (pymoo" in line for line in p.explanation)


def test_knee_fallback_on_tiny_front() -> None:
    # pymoo's HighTradeoffPoints cannot run on 2 points; the fallback (smallest normalised sum) breaks the tie
    v = np.array([[0.0, 1.0], [1.0, 0.0], [0.4, 0.4]])
    p = pick((v, MINMIN), method="knee")
    assert p.trial.number == 2
    p = pick((v[:2], MINMIN), method="knee")
    assert p.trial.number == 0 and p.runner_up.number == 1
    assert any("no high trade-off point" in line for line in p.explanation)


def test_pseudo_weights_hand_case() -> None:
    # maximised a and b; normalised (minimisation) points (0,1), (0.25,0.5), (1,0) have pseudo-weights
    # (1,0), (0.6,0.4), (0,1)
    v = np.array([[1.0, 0.0], [0.75, 0.5], [0.0, 1.0]])
    obj = [("a", "maximize"), ("b", "maximize")]
    p = pick((v, obj), {"a": 0.6, "b": 0.4}, method="pseudo-weights")
    assert p.trial.number == 1 and p.scores[0] == pytest.approx(0.0)
    p = pick((v, obj), {"a": 9, "b": 1}, method="pseudo-weights")
    assert p.trial.number == 0 and p.runner_up.number == 1
    assert p.scores == pytest.approx([0.2, 0.6, 1.8])


def test_pick_on_a_study_front() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_metric_names(["acc", "size"])
    d = {"w": optuna.distributions.FloatDistribution(0, 1)}
    for i, v in enumerate([(0.9, 5.0), (0.8, 3.0), (0.7, 4.0), (0.6, 1.0)]):
        study.add_trial(optuna.trial.create_trial(values=list(v), params={"w": i / 10}, distributions=d,
                                                  user_attrs={"summary": f"plan {i}"}))
    p = pick(load_front(study), {"acc": 1})
    assert p.trial.number == 0 and p.trial.summary == "plan 0" and p.explanation[-1] == "plan: plan 0"
    assert pick(load_front(study), {"size": 1}).trial.number == 3


@pytest.mark.parametrize(("prefer", "message"), [
    ({"acc": 1, "loss": 1}, r"--prefer: unknown objective 'loss'; known: acc, cost"),
    ({"acc": -1, "cost": 1}, r"weight of 'acc' must be a finite number >= 0"),
    ({"acc": 0, "cost": 0}, r"all weights are zero"),
    ({"acc": float("nan")}, r"weight of 'acc' must be a finite number"),
])
def test_bad_preferences(prefer: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pick(mixed_front(), prefer)


def test_other_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="empty front"):
        pick((np.zeros((0, 2)), MINMIN), {"x": 1})
    with pytest.raises(ConfigError, match=r"--min: unknown objective 'acc'; known: x, y"):
        pick((ELBOW, MINMIN), {"x": 1}, minimums={"acc": 0.5})
    with pytest.raises(ConfigError, match="unknown method 'topsis'"):
        pick((ELBOW, MINMIN), {"x": 1}, method="topsis")  # type: ignore[arg-type]


def test_parse_helpers() -> None:
    assert parse_prefer("reverse=1,swap=0.5") == {"reverse": 1.0, "swap": 0.5}
    assert parse_prefer(" reverse = 2 ") == {"reverse": 2.0}
    assert parse_minimums(["reverse=0.8", "swap=-1e-3,sort=1"]) == {"reverse": 0.8, "swap": -0.001, "sort": 1.0}
    for bad in ["reverse", "reverse=abc", "=1", "reverse=1,", "reverse=inf", ""]:
        with pytest.raises(ConfigError, match="--prefer: expected OBJ=WEIGHT"):
            parse_prefer(bad)
    with pytest.raises(ConfigError, match="'reverse' given twice"):
        parse_prefer("reverse=1,reverse=2")
    with pytest.raises(ConfigError, match=r"--min: expected OBJ=VALUE, got 'swap:0.5'"):
        parse_minimums(["swap:0.5"])
