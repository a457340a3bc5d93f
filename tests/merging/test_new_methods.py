"""mergekit 0.1.5's newer methods: sce, karcher, nuslerp, multislerp, nearswap, arcee_fusion, ram, ramplus_tl.

Expected values are computed independently: by hand (with the arithmetic in comments) or with small float64
numpy transcriptions of METHODS.md / mergekit's formulas — never with the operators' own helpers.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mergesearch.errors import ConfigError
from mergesearch.merging.methods import REQUIRED, get_method
from mergesearch.merging.ops import group_of

NEW = ("sce", "karcher", "nuslerp", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl")


def merge(method: str, tensors, base_index: int | None = None, shared: dict | None = None,
          weights: list[float] | None = None, seed: int = 0) -> torch.Tensor:
    """Run one operator with its parameters resolved as resolve.py does (defaults, Param.check)."""
    m = get_method(method)
    given = shared or {}
    sh = {k: p.check(given[k], "test") if k in given else p.default for k, p in m.shared.items()}
    assert all(v is not REQUIRED for v in sh.values()), "a required shared parameter is missing"
    per = []
    for i in range(len(tensors)):
        if m.non_base and i == base_index:
            per.append({})
        else:
            per.append({k: p.check(weights[i], "test") for k, p in m.per_input.items()})
    return m.merge(group_of("model.layers.0.mlp.up_proj.weight", tensors, base_index, seed), sh, per)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------- sce

TAU1 = [1.0, -2.0, 0.5, 0.0]
TAU2 = [3.0, 1.0, -0.5, 0.0]


def test_sce_select_topk_hand_computed():
    base = t64([0.5, 0.5, 0.5, 0.5])
    a, b = base + t64(TAU1), base + t64(TAU2)
    # variances ((τ1 − τ2)/2)² = [1, 2.25, 0.25, 0]: 3 non-zero, k = int(3·0.7) = 2 keeps entries 0 and 1
    # masked τ1 = [1, −2, 0, 0], τ2 = [3, 1, 0, 0]; weights mean(τ²) = 5/4, 10/4 -> 1/3, 2/3
    # Σ τ = [4, −1, 0, 0] -> majority [+, −, +, +]; agreeing: τ1 at 0, 1; τ2 at 0
    # entry 0: (1·1/3 + 3·2/3) / 1 = 7/3; entry 1: (−2·1/3)/(1/3) = −2; entries 2, 3: 0 / max(0, 1e-6) = 0
    out = merge("sce", [base, a, b], 0, {"select_topk": 0.7})
    torch.testing.assert_close(out, base + t64([7 / 3, -2.0, 0.0, 0.0]))


def test_sce_select_topk_one_keeps_every_entry():
    base = t64([0.0, 0.0, 0.0, 0.0])
    a, b = t64(TAU1), t64(TAU2)
    w1, w2 = (1 + 4 + 0.25) / 4, (9 + 1 + 0.25) / 4
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # majority [+, −, +, +]: entry 0 both agree, entry 1 τ1, entry 2 τ1 (0.5 > 0), entry 3 nobody (zeros)
    expected = t64([(w1 * 1 + w2 * 3) / (w1 + w2), -2.0, 0.5, 0.0])
    torch.testing.assert_close(merge("sce", [base, a, b], 0, {"select_topk": 1.0}), expected)
    torch.testing.assert_close(merge("sce", [base, a, b], 0), expected)  # default select_topk = 1


def test_sce_tiny_task_vectors_get_equal_weights_and_empty_selection_gives_base():
    base = t64([1.0, 2.0, 3.0])
    a, b = base + t64([1e-4, 0.0, -2e-4]), base + t64([3e-4, 1e-4, 0.0])
    # Σ mean(τ²) < 1e-6 -> equal weights 1/2; majority [+, +, −]
    expected = base + t64([(1e-4 + 3e-4) / 2, 1e-4, -2e-4])
    torch.testing.assert_close(merge("sce", [base, a, b], 0), expected)
    # k = int(3 · 0.2) = 0: nothing selected -> the base
    torch.testing.assert_close(merge("sce", [base, a, b], 0, {"select_topk": 0.2}), base)


# --------------------------------------------------------------------------------------------------- karcher


def test_karcher_of_orthogonal_points_is_the_symmetric_direction_times_mean_norm():
    a, b, c = t64([2.0, 0, 0]), t64([0, 3.0, 0]), t64([0, 0, 4.0])
    expected = 3.0 * t64([1, 1, 1]) / math.sqrt(3)  # mean norm 3, direction (1, 1, 1)/√3 by symmetry
    torch.testing.assert_close(merge("karcher", [a, b, c]), expected)


def test_karcher_of_two_points_is_the_geodesic_midpoint():
    a, b = t64([[1.0, 2.0], [0.0, -1.0]]), t64([[-0.5, 1.0], [3.0, 0.5]])
    na, nb = a.norm().item(), b.norm().item()
    mid = a / na + b / nb
    expected = (na + nb) / 2 * mid / mid.norm()
    torch.testing.assert_close(merge("karcher", [a, b]), expected)


def _karcher_np(points: list[np.ndarray], iters: int = 200) -> np.ndarray:
    """Reference: the Karcher mean of unit directions by Riemannian gradient descent (float64)."""
    units = [p / np.linalg.norm(p) for p in points]
    mu = sum(units) / np.linalg.norm(sum(units))
    for _ in range(iters):
        g = np.zeros_like(mu)
        for u in units:
            c = np.clip(mu @ u, -1, 1)
            th = np.arccos(c)
            if th > 1e-12:
                g += th / np.sin(th) * (u - c * mu) / len(units)
        n = np.linalg.norm(g)
        if n < 1e-14:
            break
        mu = np.cos(n) * mu + np.sin(n) * g / n
        mu /= np.linalg.norm(mu)
    return np.mean([np.linalg.norm(p) for p in points]) * mu


def test_karcher_matches_a_converged_riemannian_mean_and_identical_inputs_return_them():
    rng = np.random.default_rng(0)
    pts = [rng.normal(size=(3, 4)) + 1.0 for _ in range(4)]
    expected = _karcher_np([p.reshape(-1) for p in pts]).reshape(3, 4)
    out = merge("karcher", [torch.from_numpy(p) for p in pts], shared={"max_iter": 50, "tol": 1e-12})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-9, atol=1e-9)
    x = torch.randn(5, 6)
    torch.testing.assert_close(merge("karcher", [x, x.clone(), x.clone()]), x)


def test_karcher_ignores_zero_points_in_the_direction_but_counts_them_in_the_norm():
    a, z = t64([3.0, 4.0]), t64([0.0, 0.0])
    torch.testing.assert_close(merge("karcher", [a, z]), a / 2)  # direction of a, norm (5 + 0)/2
    torch.testing.assert_close(merge("karcher", [z, z.clone()]), z)


# --------------------------------------------------------------------------------------------------- nuslerp


def _slerp_np(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Reference slerp of two vectors on the raw vectors (lerp when colinear)."""
    c = v0 @ v1 / (np.linalg.norm(v0) * np.linalg.norm(v1))
    if abs(abs(c) - 1) < 1e-12:
        return (1 - t) * v0 + t * v1
    om = np.arccos(np.clip(c, -1, 1))
    return (np.sin((1 - t) * om) * v0 + np.sin(t * om) * v1) / np.sin(om)


def test_nuslerp_with_base_slerps_the_task_vectors_hand_computed():
    base = t64([[1.0, 1.0], [1.0, 1.0]])
    a = base + t64([[1.0, 0.0], [0.0, 0.0]])  # τ1 = e1 (flattened)
    b = base + t64([[0.0, 2.0], [0.0, 0.0]])  # τ2 = 2·e2: Ω = π/2
    # t = 1/(1+1) = 0.5: sin(π/4)·e1 + sin(π/4)·2e2
    s = math.sin(math.pi / 4)
    out = merge("nuslerp", [base, a, b], 0, weights=[0, 1.0, 1.0])
    torch.testing.assert_close(out, base + t64([[s, 2 * s], [0.0, 0.0]]))
    # t = 3/(1+3) = 0.75 (the weights need not sum to 1)
    out = merge("nuslerp", [base, a, b], 0, weights=[0, 1.0, 3.0])
    torch.testing.assert_close(out, base + t64([[math.sin(math.pi / 8), 2 * math.sin(3 * math.pi / 8)], [0, 0]]))


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_without_base_per_vector(flatten, row_wise):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    t = 0.7 / (0.3 + 0.7)
    if flatten:
        expected = _slerp_np(t, a.reshape(-1), b.reshape(-1)).reshape(3, 4)
    elif row_wise:  # mergekit's nuslerp_row_wise interpolates the vectors along dim 0 (the columns)
        expected = np.stack([_slerp_np(t, a[:, j], b[:, j]) for j in range(4)], axis=1)
    else:  # the rows
        expected = np.stack([_slerp_np(t, a[i], b[i]) for i in range(3)])
    out = merge("nuslerp", [torch.from_numpy(a), torch.from_numpy(b)],
                shared={"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}, weights=[0.3, 0.7])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_nuslerp_colinear_rows_lerp_and_zero_weights_take_the_midpoint():
    a = t64([[1.0, 2.0], [1.0, 0.0]])
    b = t64([[2.0, 4.0], [0.0, 1.0]])  # row 0 colinear with a's, row 1 orthogonal
    out = merge("nuslerp", [a, b], shared={"nuslerp_flatten": False}, weights=[1.0, 1.0])
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(out, t64([[1.5, 3.0], [s, s]]))
    # |w1 + w2| < 1e-6: t = 0.5
    torch.testing.assert_close(merge("nuslerp", [a, b], shared={"nuslerp_flatten": False}, weights=[1.0, -1.0]),
                               out)


# ------------------------------------------------------------------------------------------------ multislerp


def _multislerp_np(points: np.ndarray, w: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Reference (float64): exp map at μ of the weighted tangent vectors, times the weighted mean norm."""
    norms = np.linalg.norm(points, axis=1)
    u = points / (norms[:, None] + eps)
    mu = (w[:, None] * u).sum(0)
    mu /= np.linalg.norm(mu)
    tang = u - (u @ mu)[:, None] * mu[None]
    v = (w[:, None] * tang).sum(0)
    n = np.linalg.norm(v) + eps
    return (np.cos(n) * mu + np.sin(n) / n * v) * (norms * w).sum()


def test_multislerp_orthogonal_pair_hand_computed():
    a, b = t64([2.0, 0.0]), t64([0.0, 4.0])
    # units e1, e2, weights 1/2: μ = (1, 1)/√2, tangents (±1/2, ∓1/2) cancel; norm (2 + 4)/2 = 3
    out = merge("multislerp", [a, b], weights=[1.0, 1.0])
    torch.testing.assert_close(out, 3 * t64([1.0, 1.0]) / math.sqrt(2))


def test_multislerp_with_base_and_three_models():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(2, 5))
    xs = [base + rng.normal(size=(2, 5)) for _ in range(3)]
    w = np.array([0.2, 0.5, 0.9])
    expected = base + _multislerp_np(np.stack([(x - base).reshape(-1) for x in xs]), w / w.sum()).reshape(2, 5)
    out = merge("multislerp", [torch.from_numpy(base), *map(torch.from_numpy, xs)], 0, weights=[0, *w])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)
    # normalize_weights: false uses the weights as given
    w2 = np.array([0.3, 0.3, 0.3])
    expected = base + _multislerp_np(np.stack([(x - base).reshape(-1) for x in xs]), w2).reshape(2, 5)
    out = merge("multislerp", [torch.from_numpy(base), *map(torch.from_numpy, xs)], 0, weights=[0, *w2],
                shared={"normalize_weights": False})
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_multislerp_identical_single_and_antipodal_inputs():
    x = torch.randn(4, 3)
    torch.testing.assert_close(merge("multislerp", [x, x.clone(), x.clone()], weights=[1.0, 2.0, 3.0]), x)
    torch.testing.assert_close(merge("multislerp", [x], weights=[0.5]), x)  # one input: returned as is
    base = torch.zeros(3, dtype=torch.float64)
    v = t64([1.0, 2.0, 2.0])
    # two antipodal task vectors with equal weights: no mean direction -> linear fallback (here 0)
    torch.testing.assert_close(merge("multislerp", [base, base + v, base - v], 0, weights=[0, 1.0, 1.0]), base)
    with pytest.raises(ConfigError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight'.*direction is zero"):
        merge("multislerp", [v, -v, v.clone(), -v], weights=[1.0] * 4)


# -------------------------------------------------------------------------------------------------- nearswap


def test_nearswap_hand_computed_and_t_zero_is_the_base():
    base = t64([1.0, 1.0, 1.0, 1.0])
    other = base + t64([0.05, -0.2, 1.0, 0.0])
    # w = clamp(0.1 / max(|Δ|, 1e-6), 0, 1) = [1, 0.5, 0.1, 1]
    out = merge("nearswap", [base, other], 0, {"t": 0.1})
    torch.testing.assert_close(out, base + t64([0.05, -0.1, 0.1, 0.0]))
    out = merge("nearswap", [other, base], 1, {"t": 0.1})  # the base need not come first
    torch.testing.assert_close(out, base + t64([0.05, -0.1, 0.1, 0.0]))
    assert torch.equal(merge("nearswap", [base, other], 0, {"t": 0.0}), base)


# ---------------------------------------------------------------------------------------------- arcee_fusion


def _arcee_np(theta: np.ndarray, base: np.ndarray) -> np.ndarray:
    """Reference: keep θ where |Δ|·KL(softmax θ ‖ softmax θ0) (per row) reaches median + 1.5·IQR."""

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(theta) + 1e-8, softmax(base) + 1e-8
    imp = np.abs(theta - base) * (p * np.log(p / q)).sum(-1, keepdims=True)
    s = np.sort(imp.reshape(-1))
    m = s.size
    q1, med, q3 = s[int(0.25 * (m - 1))], s[int(0.5 * (m - 1))], s[int(0.75 * (m - 1))]
    return np.where(imp >= med + 1.5 * (q3 - q1), theta, base)


def test_arcee_fusion_matches_reference_and_keeps_the_outliers():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 10))
    theta = base + 0.01 * rng.normal(size=(6, 10))
    theta[2, 3] += 2.0  # one large change in a row whose distribution it also shifts: above the fence
    expected = _arcee_np(theta, base)
    out = merge("arcee_fusion", [torch.from_numpy(base), torch.from_numpy(theta)], 0)
    np.testing.assert_array_equal(out.numpy(), expected)
    kept = expected != base
    assert kept[2, 3] and 0 < kept.sum() < kept.size // 2


def test_arcee_fusion_mostly_unchanged_tensor_keeps_every_change():
    # over 3/4 of the entries unchanged: q1 = median = q3 = 0, the fence is 0 and every entry passes it
    base = t64([[0.0, 1.0, 2.0, 3.0]] * 2)
    theta = base.clone()
    theta[0, 1] = 5.0
    torch.testing.assert_close(merge("arcee_fusion", [base, theta], 0), theta)


def test_arcee_fusion_samples_quantiles_above_one_million_entries_with_the_seed():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1001, 1000, generator=g)
    theta = base + 0.01 * torch.randn(1001, 1000, generator=g)
    a = merge("arcee_fusion", [base, theta], 0, seed=5)
    assert torch.equal(a, merge("arcee_fusion", [base, theta], 0, seed=5))  # deterministic
    b = merge("arcee_fusion", [base, theta], 0, seed=6)
    exact = torch.from_numpy(_arcee_np(theta.double().numpy(), base.double().numpy()))
    frac = [(x != base).double().mean().item() for x in (a, b, exact)]
    # a sample of 1M from 1.001M entries estimates the fence closely: kept fractions within 0.2 % (absolute)
    assert abs(frac[0] - frac[2]) < 2e-3 and abs(frac[1] - frac[2]) < 2e-3


# ------------------------------------------------------------------------------------------------ ram, ram+


def test_ram_hand_computed():
    base = t64([1.0, 1.0, 1.0, 1.0, 1.0])
    a = base + t64([1.0, 0.0, 2.0, 0.0, 1e-6])
    b = base + t64([3.0, 4.0, 0.0, 5.0, 1e-6])
    # changed (|τ| > 1e-5): a at 0, 2; b at 0, 1, 3; entry 4 is below epsilon for both
    # entry 0 overlaps: (1 + 3)/2; unique entries kept as they are
    torch.testing.assert_close(merge("ram", [base, a, b], 0), base + t64([2.0, 4.0, 2.0, 5.0, 0.0]))
    # epsilon 2: only |τ| > 2 counts -> a changed nothing; b at 0, 1, 3 (unique)
    torch.testing.assert_close(merge("ram", [base, a, b], 0, {"epsilon": 2.0}), base + t64([3.0, 4.0, 0, 5.0, 0]))


def test_ramplus_tl_hand_computed():
    base = t64([1.0, 1.0, 1.0, 1.0, 1.0])
    a = base + t64([1.0, 0.0, 2.0, 0.0, 1e-6])
    b = base + t64([3.0, 4.0, 0.0, 5.0, 1e-6])
    # a: 1 overlapping, 1 unique -> ρ = 1, clamp to alpha 0.8 -> λ = 1 + 0.5·0.8 = 1.4
    # b: 1 overlapping, 2 unique -> ρ = 0.5 -> λ = 1 + 0.5·0.5 = 1.25
    out = merge("ramplus_tl", [base, a, b], 0, {"r": 0.5, "alpha": 0.8})
    torch.testing.assert_close(out, base + t64([2.0, 4.0 * 1.25, 2.0 * 1.4, 5.0 * 1.25, 0.0]))
    # defaults r = 0.1, alpha = 0.2: both ρ clamp to 0.2 -> λ = 1.02
    out = merge("ramplus_tl", [base, a, b], 0)
    torch.testing.assert_close(out, base + t64([2.0, 4.08, 2.04, 5.1, 0.0]))


def test_ramplus_tl_expert_without_unique_entries_and_epsilon_zero_stay_finite():
    base = torch.zeros(4, dtype=torch.float64)
    a, b = t64([1.0, 1.0, 0.0, 0.0]), t64([1.0, 1.0, 2.0, 0.0])
    # a has no unique entry (its λ scales nothing); b: 2 overlapping, 1 unique -> ρ = 2 -> λ = 1 + 0.1·0.2
    out = merge("ramplus_tl", [base, a, b], 0, {"epsilon": 0.0})
    torch.testing.assert_close(out, t64([1.0, 1.0, 2.0 * 1.02, 0.0]))


# ------------------------------------------------------------------------------------------ every method


def _case(method: str, dtype: torch.dtype, scale: float = 1.0, delta: float = 1.0):
    """(tensors, base_index, shared, weights) for a (16, 24) tensor: values on a 1/64 grid in [−2, 2] (exact in
    bfloat16 and float16, and so are their differences), times ``scale``, task vectors times ``delta``."""
    g = torch.Generator().manual_seed(zlib.crc32(method.encode()))

    def grid(*shape):
        return torch.randint(-128, 129, shape, generator=g).double() / 64

    base = grid(16, 24) * scale
    others = [base + grid(16, 24) * delta * (torch.rand(16, 24, generator=g) < 0.6) for _ in range(3)]
    n_other = {"nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}.get(method, 3)
    tensors = [base, *others[:n_other]]
    shared = {"nearswap": {"t": 0.25 * delta}}.get(method, {})
    weights = [0.0, 0.25, 0.5, 0.75][: len(tensors)]
    return [t.to(dtype) for t in tensors], (None if method == "karcher" else 0), shared, weights


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_the_float32_result_rounded_once(method, dtype):
    tensors, b, shared, weights = _case(method, dtype)
    out = merge(method, tensors, b, shared, weights)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = merge(method, [t.float() for t in tensors], b, shared, weights)
    assert ref.dtype == torch.float32
    # same float32 computation on the same (exactly representable) values: at most one rounding apart
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale,delta", [(256.0, 1.0), (1.0, 1 / 1024)])
def test_half_precision_large_values_and_tiny_changes_stay_finite(method, dtype, scale, delta):
    # values up to 512 (squared norms overflow float16: 384 entries of ~256² > 65504), and changes of ~1e-4
    # (epsilons such as 1e-8 are 0 in float16): computed in float32, rounded once
    tensors, b, shared, weights = _case(method, torch.float64, scale=scale, delta=delta)
    out = merge(method, [t.to(dtype) for t in tensors], b, shared, weights)
    assert torch.isfinite(out).all()
    ref = merge(method, [t.to(dtype).float() for t in tensors], b, shared, weights)
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("method", NEW)
def test_float64_inputs_stay_float64_and_out_is_written(method):
    tensors, b, shared, weights = _case(method, torch.float64)
    m = get_method(method)
    out = torch.empty(16, 24, dtype=torch.float64)
    group = group_of("w", tensors, b)
    group.out = out
    sh = {k: p.check(shared[k], "t") if k in shared else p.default for k, p in m.shared.items()}
    per = [{} if (m.non_base and i == b) else {k: weights[i] for k in m.per_input} for i in range(len(tensors))]
    res = m.merge(group, sh, per)
    assert res is out and res.dtype == torch.float64
    torch.testing.assert_close(res, merge(method, tensors, b, shared, weights))


# ---------------------------------------------------------------------------------------------- bad input


def _one_line_config_error(fn, pattern: str) -> None:
    with pytest.raises(ConfigError) as exc:
        fn()
    msg = str(exc.value)
    assert "\n" not in msg
    assert "model.layers.0.mlp.up_proj.weight" in msg, msg
    assert re.search(pattern, msg), msg


def test_bad_inputs_name_the_tensor_in_one_line():
    x = [torch.randn(3) for _ in range(4)]
    _one_line_config_error(lambda: merge("nuslerp", x[:3], weights=[1.0] * 3), "exactly 2 models besides the base")
    _one_line_config_error(lambda: merge("nuslerp", x[:2], 0, weights=[0, 1.0]), "exactly 2 models besides")
    _one_line_config_error(lambda: merge("nearswap", x[:3], 0, {"t": 0.1}), "exactly 1 other model")
    _one_line_config_error(lambda: merge("arcee_fusion", x[:3], 0), "exactly 1 other model")
    _one_line_config_error(lambda: merge("multislerp", x[:1], 0, weights=[0]), "at least one model")
    _one_line_config_error(lambda: merge("multislerp", x[:2], weights=[1.0, -1.0]), "weights sum to zero")
    _one_line_config_error(lambda: merge("sce", x[:2]), "needs the base")


def test_methods_are_registered_with_mergekit_names_and_defaults():
    for name in NEW:
        assert get_method(name).mergekit == name
    assert get_method("sce").shared["select_topk"].default == 1.0
    kar = get_method("karcher").shared
    assert kar["max_iter"].default == 10 and kar["max_iter"].kind == "int" and kar["tol"].default == 1e-5
    nus = get_method("nuslerp")
    assert nus.shared["nuslerp_flatten"].default is True and nus.shared["nuslerp_row_wise"].default is False
    assert nus.per_input["weight"].default is REQUIRED and not nus.needs_base
    ms = get_method("multislerp")
    assert ms.shared["normalize_weights"].default is True and ms.shared["eps"].default == 1e-8
    assert get_method("nearswap").shared["t"].default is REQUIRED
    assert get_method("arcee_fusion").random
    rp = get_method("ramplus_tl").shared
    assert (rp["r"].default, rp["alpha"].default, rp["epsilon"].default) == (0.1, 0.2, 1e-5)


# ----------------------------------------------------------------------------------------------- end to end


def _write(tmp_path: Path, plan: dict) -> Path:
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(plan))
    return p


@pytest.mark.parametrize("method", NEW)
def test_merge_config_end_to_end(method, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from mergesearch.merging.run import merge_config

    m = {k: str(v) for k, v in tiny_models.items()}
    params = {"nuslerp": {"weight": 1.0}, "multislerp": {"weight": 1.0}}.get(method)
    n_models = {"nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}.get(method, 3)
    plan = {"merge_method": method, "base_model": m["base"], "dtype": "float32",
            "models": [{"model": m[k], **({"parameters": params} if params else {})} for k in "abc"[:n_models]]}
    if method == "nearswap":
        plan["parameters"] = {"t": 0.01}
    if method == "nuslerp":
        plan["models"][1]["parameters"] = {"weight": 3.0}  # t = 3/4
    out = merge_config(_write(tmp_path, plan), tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(Path(m["base"]) / "model.safetensors"))
    assert merged.keys() == base.keys()
    assert all(torch.isfinite(t).all() and t.shape == base[k].shape for k, t in merged.items())
    assert (out / "mergekit_config.yml").is_file() and yaml.safe_load((out / "mergekit_config.yml").read_text())[
        "merge_method"] == method
    name = "model.layers.1.mlp.up_proj.weight"
    x0 = base[name].double().numpy()
    xs = [load_file(str(Path(m[k]) / "model.safetensors"))[name].double().numpy() for k in "abc"[:n_models]]
    got = merged[name].double().numpy()
    if method == "nuslerp":  # flattened slerp of the task vectors at t = 3/4
        expected = x0 + _slerp_np(0.75, (xs[0] - x0).reshape(-1), (xs[1] - x0).reshape(-1)).reshape(x0.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    elif method == "nearswap":
        d = xs[0] - x0
        np.testing.assert_allclose(got, x0 + np.clip(0.01 / np.maximum(np.abs(d), 1e-6), 0, 1) * d, atol=1e-6)
    elif method == "karcher":  # the base is one more input
        expected = _karcher_np([x.reshape(-1) for x in (*xs, x0)]).reshape(x0.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    elif method == "ram":  # each entry: the mean of the task vectors changing it by more than 1e-5
        taus = np.stack([x - x0 for x in xs])
        changed = np.abs(taus) > 1e-5
        expected = x0 + (taus * changed).sum(0) / np.maximum(changed.sum(0), 1)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    else:
        assert not np.array_equal(got, x0)


def test_merge_config_nuslerp_with_three_models_and_no_base_names_the_tensor(tiny_models, tmp_path):
    from mergesearch.merging.run import merge_config

    plan = {"merge_method": "nuslerp",
            "models": [{"model": str(tiny_models[k]), "parameters": {"weight": 1.0}} for k in "abc"]}
    with pytest.raises(ConfigError, match=r"tensor 'model\.embed_tokens\.weight': nuslerp merges exactly 2 models"):
        merge_config(_write(tmp_path, plan), tmp_path / "out")
    assert not (tmp_path / "out").exists()
