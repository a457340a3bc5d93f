"""Cost objectives against closed forms."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.objectives import ObjectiveContext, SafetensorsState, build_objectives
from tests.objectives.conftest import objective

KINDS = ("l1_from_base", "nonzero_delta", "params", "layers")


@pytest.fixture
def fresh(lm):
    """A private copy of the test model (these tests modify weights) and the lazy base state of its dir."""
    from transformers import AutoModelForCausalLM

    path = lm[2]
    return AutoModelForCausalLM.from_pretrained(path), lm[1], SafetensorsState(path)


def build(base):
    return build_objectives([objective(type=k) for k in KINDS], ObjectiveContext(base_state=base))


def values(objs, model, tok):
    return {o.name: o(model, tok) for o in objs}


def test_costs_of_base_itself(fresh):
    model, tok, base = fresh
    v = values(build(base), model, tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert v == {"l1_from_base": 0.0, "nonzero_delta": 0.0, "params": n_params, "layers": 2}
    # tiny Llama (hidden 32, vocab 20, 2 layers, untied): embeddings + head + norm + 2 x (4 attn + 3 mlp + 2 norms)
    assert n_params == 2 * 20 * 32 + 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32)
    assert all(o.direction == "minimize" for o in build(base))


def test_costs_of_base_plus_known_delta(fresh):
    model, tok, base = fresh
    sd = model.state_dict()
    q, emb = sd["model.layers.0.self_attn.q_proj.weight"], sd["model.embed_tokens.weight"]
    total = sum(t.numel() for k, t in sd.items() if k in base)
    with torch.no_grad():
        q.add_(0.25)  # 1024 entries moved by 0.25
        emb[3].sub_(0.5)  # 32 entries moved by 0.5
    v = values(build(base), model, tok)
    assert v["l1_from_base"] == pytest.approx(0.25 * q.numel() + 0.5 * 32, rel=1e-5)
    assert v["nonzero_delta"] == pytest.approx((q.numel() + 32) / total)


def test_layers_follow_architecture_changes(fresh):
    model, tok, base = fresh
    (layers, l1) = build_objectives([objective(type="layers"), objective(type="l1_from_base")],
                                    ObjectiveContext(base_state=base))
    dropped = sum(float(t.abs().sum()) for k, t in model.state_dict().items() if k.startswith("model.layers.1."))
    del model.model.layers[1]  # a layer-wise plan that dropped block 1
    assert layers(model, tok) == 1
    # the remaining tensors still equal the base's; the dropped block counts as the base block zeroed
    assert l1(model, tok) == pytest.approx(dropped, rel=1e-6) and dropped > 0


def _slices(base: str, runs: list[tuple[str, int, int]]) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in runs]}


@pytest.fixture(scope="module")
def resident(tiny_models):
    from mergesearch.merging.apply import ResidentMerger

    m = ResidentMerger(str(tiny_models["base"]), [str(tiny_models[k]) for k in "ab"])
    return m, tiny_models, {k: str(v) for k, v in tiny_models.items()}


def _costs(merger, plan):
    from mergesearch.merging.plan import MergePlan

    l1, nz = build_objectives([objective(type="l1_from_base"), objective(type="nonzero_delta")],
                              ObjectiveContext(base_state=merger.base_state))
    model = merger.apply(MergePlan.model_validate(plan))
    return l1(model, None), nz(model, None)


def test_dropping_a_layer_never_beats_keeping_it_as_base(resident):
    """Plans from ResidentMerger: [a0, b1] vs [a0, skip] vs [a0, base1] vs [skip, a1] on a 2-layer base."""
    merger, _, m = resident
    keep_base = _costs(merger, _slices(m["base"], [(m["a"], 0, 1), (m["base"], 1, 2)]))
    drop = _costs(merger, _slices(m["base"], [(m["a"], 0, 1)]))
    expert = _costs(merger, _slices(m["base"], [(m["a"], 0, 1), (m["b"], 1, 2)]))
    assert keep_base[0] < drop[0] and keep_base[1] < drop[1]  # deleting is not free
    assert keep_base[0] < expert[0]
    # dropping layer 0 and keeping a's layer 1: layer 1 is compared with base layer 1, not base layer 0
    shifted = _costs(merger, _slices(m["base"], [(m["a"], 1, 2)]))
    a = merger.checkpoints[m["a"]]
    sd_base = merger.base_state
    want = sum(float((a.get(n, torch.float32) - sd_base[n]).abs().double().sum()) for n in sd_base
               if n.startswith("model.layers.1."))
    want += sum(float(sd_base[n].abs().double().sum()) for n in sd_base if n.startswith("model.layers.0."))
    sd = merger.model.state_dict()  # embeddings, norm and head of this plan (taken from a) by name
    want += sum(float((sd[n] - sd_base[n]).abs().double().sum()) for n in sd_base if ".layers." not in n)
    assert shifted[0] == pytest.approx(want, rel=1e-5)
    assert _costs(merger, _slices(m["base"], [(m["base"], 0, 2)])) == (0.0, 0.0)  # the base itself


def test_repeated_layers_pair_once_and_count_the_rest(resident):
    """[base0, base1, base1]: one copy of layer 1 pairs with the base (0), the other is an inserted block."""
    merger, _, m = resident
    l1, _ = _costs(merger, _slices(m["base"], [(m["base"], 0, 2), (m["base"], 1, 2)]))
    sd = merger.base_state
    inserted = sum(float(sd[n].abs().double().sum()) for n in sd if n.startswith("model.layers.1."))
    assert l1 == pytest.approx(inserted, rel=1e-6)
    # [a1, base1] for depth 1 (and depth 0 dropped): base1 is the copy paired, a's copy counts in full
    l1b, _ = _costs(merger, _slices(m["base"], [(m["a"], 1, 2), (m["base"], 1, 2)]))
    a = merger.checkpoints[m["a"]]
    want = sum(float(a.get(n, torch.float32).abs().double().sum()) for n in sd if n.startswith("model.layers.1."))
    want += sum(float(sd[n].abs().double().sum()) for n in sd if n.startswith("model.layers.0."))
    out = merger.model.state_dict()
    want += sum(float((out[n] - sd[n]).abs().double().sum()) for n in sd if ".layers." not in n)
    assert l1b == pytest.approx(want, rel=1e-5)


def test_latency_is_positive_and_params_validated(fresh):
    model, tok, _ = fresh
    (lat,) = build_objectives([objective(type="latency", batch=2, length=8, repeats=3)], ObjectiveContext())
    assert 0 < lat(model, tok) < 10_000 and lat.direction == "minimize"


def test_l1_without_base_is_a_config_error(fresh):
    model, tok, _ = fresh
    (l1,) = build_objectives([objective(type="l1_from_base")], ObjectiveContext())
    with pytest.raises(ConfigError, match="'l1_from_base': needs the base model"):
        l1(model, tok)
