"""Closed forms of the merge operators (mergekit 0.1.5 semantics)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.merging import sparsify as sp
from mergesearch.merging.methods import METHODS, get_method
from mergesearch.merging.ops import group_of, slerp_tensors
from tests.merging.reference import run


def merge(method: str, tensors, per_input, shared=None, base_index=None, seed=0):
    m = get_method(method)
    params = {k: p.default for k, p in m.shared.items()}
    params.update(shared or {})
    full = [{**{k: p.default for k, p in m.per_input.items() if p.default is not None and
                not (m.non_base and i == base_index)}, **p} for i, p in enumerate(per_input)]
    return m.merge(group_of("x", tensors, base_index, seed), params, full)


def test_linear_weights_one_zero_returns_first_source():
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    assert torch.equal(merge("linear", [a, b], [{"weight": 1.0}, {"weight": 0.0}]), a)


def test_linear_unnormalized_is_weighted_sum():
    a, b = torch.randn(3), torch.randn(3)
    out = merge("linear", [a, b], [{"weight": 2.0}, {"weight": 3.0}], {"normalize": False})
    torch.testing.assert_close(out, 2 * a + 3 * b)


def test_task_arithmetic_lambda_zero_returns_base():
    base, a = torch.randn(6, 2), torch.randn(6, 2)
    out = merge("task_arithmetic", [base, a], [{}, {"weight": 1.0}], {"lambda": 0.0}, base_index=0)
    assert torch.equal(out, base)


def test_task_arithmetic_closed_form():
    base, a, b = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3)
    out = merge("task_arithmetic", [base, a, b], [{}, {"weight": 0.5}, {"weight": 2.0}], {"lambda": 0.7},
                base_index=0)
    torch.testing.assert_close(out, base + 0.7 * (0.5 * (a - base) + 2.0 * (b - base)))


def test_ties_hand_computed_2x3():
    base = torch.zeros(2, 3)
    t1 = torch.tensor([[1.0, -2.0, 3.0], [-0.5, 0.1, 4.0]])
    t2 = torch.tensor([[-3.0, 1.0, 1.5], [0.2, -0.3, -0.9]])
    # density 0.5 keeps int(0.5*6) = 3 largest |τ| per model:
    #   t1 -> [[0, -2, 3], [0, 0, 4]]; t2 -> [[-3, 1, 1.5], [0, 0, 0]]
    # weights 1, 1: sums [[-3, -1, 4.5], [0, 0, 4]] -> signs [[-, -, +], [+, +, +]]
    # agreeing entries: [[t2, t1, t1 and t2], [none, none, t1]]; normalize divides by the agreeing weights
    out = merge("ties", [base, t1, t2], [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}],
                base_index=0)
    expected = torch.tensor([[-3.0, -2.0, 2.25], [0.0, 0.0, 4.0]])
    torch.testing.assert_close(out, expected)


def _kept(method: str, tau: torch.Tensor, density: float, gamma: float = 0.01) -> list[bool]:
    """Which entries of τ survive a one-input sparsifying merge (base 0, weight 1, no rescale)."""
    out = run(method, torch.zeros_like(tau), [tau], per={"weight": 1.0, "density": density, "gamma": gamma},
              shared={"rescale": False, "normalize": False})
    return (out != 0).tolist()


def test_magnitude_keeps_at_least_one_and_density_zero_keeps_none():
    tau = torch.tensor([0.1, -5.0, 0.2])
    assert _kept("ties", tau, 0.1) == [False, True, False]
    assert _kept("ties", tau, 0.0) == [False] * 3
    assert _kept("ties", tau, 1.0) == [True] * 3


def test_cached_order_gives_same_thresholds_as_selection():
    tau = torch.randn(50, 40)
    order = sp.MagnitudeOrder(tau)
    n = tau.numel()
    for d in (0.05, 0.3, 0.77):
        rank = n - max(1, int(d * n))
        assert sp.order_value(tau, rank, order).item() == sp.order_value(tau, rank, None).item()
        assert sp.outliers_band(tau, d, 0.02, order) == sp.outliers_band(tau, d, 0.02)
        assert sum(_kept("ties", tau.reshape(-1), d)) == int(d * n)


def test_breadcrumbs_with_no_top_outliers_keeps_top_entries():
    tau = torch.arange(1.0, 11.0)  # n = 10, int(0.01 * 10) = 0 top entries dropped
    assert _kept("breadcrumbs", tau, 0.3) == [False] * 7 + [True] * 3


def test_breadcrumbs_drops_outliers_then_smallest():
    tau = torch.arange(1.0, 101.0)  # gamma 0.05 drops 96..100; density 0.2 keeps 20 below them
    kept = _kept("breadcrumbs", tau, 0.2, gamma=0.05)
    assert tau[torch.tensor(kept)].tolist() == list(map(float, range(76, 96)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_rescale_scales_kept_entries_by_the_l1_ratio(method, dtype):
    """mergekit rescales for every sparsifier: the kept entries times ‖τ‖₁ / ‖mask⊙τ‖₁."""
    torch.manual_seed(0)
    tau = torch.randn(40, 30).to(dtype)
    base = torch.zeros_like(tau)
    kw = {"per": {"weight": 1.0, "density": 0.3, "gamma": 0.05}, "shared": {"normalize": False}}
    plain = run(method, base, [tau], **kw)
    scaled = run(method, base, [tau], **{**kw, "shared": {"normalize": False, "rescale": True}})
    kept = plain != 0
    ratio = tau.double().abs().sum() / tau.double()[kept].abs().sum()
    assert 1.5 < ratio.item() < 10
    torch.testing.assert_close(scaled.double(), plain.double() * ratio, rtol=torch.finfo(dtype).eps, atol=0)


def test_dare_preserves_expected_value_seeded():
    torch.manual_seed(0)
    base, a = torch.zeros(200_000), torch.randn(200_000)
    out = merge("dare_linear_invdensity", [base, a], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    torch.testing.assert_close(out[kept], a[kept] / 0.3)
    # E[out] = a: the mean of out/a over many entries is 1
    assert abs((out / a).mean().item() - 1) < 0.02
    l1 = merge("dare_linear", [base, a], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=1)
    torch.testing.assert_close(l1.abs().sum(), a.abs().sum())  # mergekit's L1-norm matching
    again = merge("dare_linear", [base, a], [{}, {"weight": 1.0, "density": 0.3}], base_index=0, seed=1)
    assert torch.equal(l1, again)


def test_della_probabilities_span_density_pm_epsilon():
    p = sp.della_probabilities(torch.tensor([[0.1, -3.0, 2.0]]), 0.5, 0.2)
    torch.testing.assert_close(p, torch.tensor([[0.3, 0.7, 0.5]]))
    with pytest.raises(ConfigError, match="epsilon"):
        sp.della_probabilities(torch.ones(2, 2), 0.9, 0.15)


def test_slerp_endpoints_and_lerp_fallback():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(slerp_tensors(0.0, a, b), a)
    torch.testing.assert_close(slerp_tensors(1.0, a, b), b)
    # colinear inputs: lerp
    torch.testing.assert_close(slerp_tensors(0.25, a, 2 * a), 0.75 * a + 0.25 * 2 * a)
    # orthogonal unit vectors: the midpoint stays on the unit circle
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp_tensors(0.5, x, y), torch.tensor([2**-0.5, 2**-0.5]))


def test_model_stock_identical_task_vectors_gives_the_expert():
    base, a = torch.zeros(10), torch.randn(10)
    out = merge("model_stock", [base, a, a.clone()], [{}, {}, {}], base_index=0)
    torch.testing.assert_close(out, a)  # cos = 1 -> t = 1


def test_passthrough_scale():
    a = torch.randn(3)
    torch.testing.assert_close(merge("passthrough", [a], [{"scale": 0.5}]), a * 0.5)


def test_unknown_method_names_known_ones():
    with pytest.raises(ConfigError, match=r"unknown merge_method 'foo'.*ties"):
        get_method("foo")


def test_registry_has_every_mergekit_method():
    names = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
             "della", "della_linear", "slerp", "model_stock", "passthrough"}
    assert names <= set(METHODS)


@pytest.mark.parametrize("method", ["dare_linear_invdensity", "della_linear"])
def test_random_masks_are_independent_across_inputs(method):
    base, a = torch.zeros(20_000), torch.randn(20_000)
    p = {"weight": 1.0, "density": 0.5, "epsilon": 0.1}
    out = merge(method, [base, a, a], [{}, p, p], {"rescale": False}, base_index=0, seed=4)
    one_kept = torch.isclose(out, a) & (a.abs() > 1e-3)
    assert 0.4 < one_kept.float().mean().item() < 0.6  # kept by exactly one of the two inputs
