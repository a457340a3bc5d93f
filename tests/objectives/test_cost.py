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
    del model.model.layers[1]  # a layer-wise plan that dropped block 1
    assert layers(model, tok) == 1
    assert l1(model, tok) == 0.0  # the remaining tensors still equal the base's


def test_latency_is_positive_and_params_validated(fresh):
    model, tok, _ = fresh
    (lat,) = build_objectives([objective(type="latency", batch=2, length=8, repeats=3)], ObjectiveContext())
    assert 0 < lat(model, tok) < 10_000 and lat.direction == "minimize"


def test_l1_without_base_is_a_config_error(fresh):
    model, tok, _ = fresh
    (l1,) = build_objectives([objective(type="l1_from_base")], ObjectiveContext())
    with pytest.raises(ConfigError, match="'l1_from_base': needs the base model"):
        l1(model, tok)
