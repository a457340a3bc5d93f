"""Permutation alignment (issue 17): permuted blocks compute the same function, and both matchers undo a permutation.

Tiny random Llama-family models (hidden 32, 4 query heads over 2 KV heads, intermediate 64, 2 layers) built here
with fixed seeds; the whole file runs in a few seconds on one thread.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from mergesearch.errors import DataError, ModelError
from mergesearch.merging.align import (
    LayerPermutation,
    ModelPermutation,
    activation_matching,
    apply_permutation,
    check_alignable,
    load_permutations,
    permute_tensor,
    save_permutations,
    task_vector_norm,
    weight_matching,
    widths_of,
)

VOCAB = 64


def tiny_config(kind: str = "llama", **over) -> LlamaConfig:
    # initializer_range 0.1 (not 0.02) gives logits of order 1, so 1e-5 is a tight check
    kw = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": False, "initializer_range": 0.1}
    kw.update(over)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(**kw)


def build(config, state: dict[str, torch.Tensor] | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if state is not None:
        model.load_state_dict(state)
    return model.to(dtype).eval()


def prompts(n: int = 4, tokens: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, tokens), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rand_perm(config, seed: int = 8) -> ModelPermutation:
    perm = ModelPermutation.random(config, torch.Generator().manual_seed(seed))
    assert not any(torch.equal(lp.attn, torch.arange(len(lp.attn))) for lp in perm.layers), "pick another seed"
    return perm


def noisy(state: dict[str, torch.Tensor], std: float, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def gqa():
    """(config, model, state, permutation, permuted state, permuted model)."""
    cfg = tiny_config()
    model = build(cfg)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    perm = rand_perm(cfg)
    psd = apply_permutation(sd, cfg, perm)
    return cfg, model, sd, perm, psd, build(cfg, psd)


# -------------------------------------------------------------------------------------------- same function


CONFIGS = {
    "llama-gqa": lambda: tiny_config(),
    "llama-mha": lambda: tiny_config(num_key_value_heads=4),
    "llama-mqa": lambda: tiny_config(num_key_value_heads=1),
    "llama-biases": lambda: tiny_config(attention_bias=True, mlp_bias=True),
    "llama-head_dim": lambda: tiny_config(head_dim=16),  # q_proj wider than the residual stream
    "mistral": lambda: tiny_config("mistral"),
    "qwen2": lambda: tiny_config("qwen2"),  # q/k/v biases
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_permuted_model_same_logits_float32(name):
    cfg = CONFIGS[name]()
    model = build(cfg)
    sd = model.state_dict()
    if name == "llama-biases" or name == "qwen2":
        # biases start at zero: make them count
        g = torch.Generator().manual_seed(9)
        sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) if k.endswith(".bias") else v for k, v in sd.items()}
        model.load_state_dict(sd)
    perm = ModelPermutation.random(cfg, torch.Generator().manual_seed(8))
    psd = apply_permutation(sd, cfg, perm)
    changed = [k for k in sd if not torch.equal(sd[k], psd[k])]
    assert any("gate_proj" in k for k in changed)
    # with one KV head (MQA) all query heads form one unit: nothing in attention moves
    assert any("q_proj" in k for k in changed) == (cfg.num_key_value_heads > 1)
    if name in ("llama-biases", "qwen2"):
        assert any(k.endswith("q_proj.bias") for k in changed)
    ids = prompts()
    ref, out = logits(model, ids), logits(build(cfg, psd), ids)
    assert ref.abs().max() > 0.5  # logits of order 1: 1e-5 is tight
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_permuted_model_same_logits_half(gqa, dtype):
    cfg, _, sd, perm, _, _ = gqa
    half = {k: v.to(dtype) for k, v in sd.items()}
    psd = apply_permutation(half, cfg, perm)  # index_select on half tensors: exact, dtype kept
    assert all(v.dtype == dtype for v in psd.values())
    assert all(torch.equal(psd[k], v.to(dtype)) for k, v in apply_permutation(sd, cfg, perm).items())
    ids = prompts()
    ref, out = logits(build(cfg, half, dtype=dtype), ids), logits(build(cfg, psd, dtype=dtype), ids)
    # the permuted sums round differently: allow a few units in the last place of the logits' scale
    atol = 8 * torch.finfo(dtype).eps * float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=0, atol=atol)


def test_apply_is_pure_and_inverse_undoes(gqa):
    cfg, _, sd, perm, psd, _ = gqa
    before = {k: v.clone() for k, v in sd.items()}
    back = apply_permutation(psd, cfg, perm.inverse())
    assert all(torch.equal(sd[k], before[k]) for k in sd)  # input untouched
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    # residual-stream tensors are never moved (the same objects come back)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert psd[k] is sd[k]
    ident = apply_permutation(sd, cfg, ModelPermutation.identity(cfg))
    assert all(ident[k] is sd[k] for k in sd)
    # tensor by tensor (a checkpoint read lazily) gives the same state
    assert all(torch.equal(permute_tensor(k, v, perm), psd[k]) for k, v in sd.items())
    with pytest.raises(ModelError, match="has shape"):
        permute_tensor("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 32), perm)


# -------------------------------------------------------------------------------------------------- GQA units


def test_gqa_groups_move_together(gqa):
    cfg, _, sd, perm, psd, _ = gqa
    w = widths_of(cfg)
    D, G = w.head_dim, w.group
    assert (w.heads, w.kv_heads, G, D) == (4, 2, 2, 8)
    for i, lp in enumerate(perm.layers):
        q, pq = sd[f"model.layers.{i}.self_attn.q_proj.weight"], psd[f"model.layers.{i}.self_attn.q_proj.weight"]
        k, pk = sd[f"model.layers.{i}.self_attn.k_proj.weight"], psd[f"model.layers.{i}.self_attn.k_proj.weight"]
        o, po = sd[f"model.layers.{i}.self_attn.o_proj.weight"], psd[f"model.layers.{i}.self_attn.o_proj.weight"]
        for j, src in enumerate(lp.attn.tolist()):
            # new group j = old KV head src with both of its query heads (query head h reads KV head h // G)
            assert torch.equal(pk[j * D:(j + 1) * D], k[src * D:(src + 1) * D])
            assert torch.equal(pq[j * G * D:(j + 1) * G * D], q[src * G * D:(src + 1) * G * D])
            assert torch.equal(po[:, j * G * D:(j + 1) * G * D], o[:, src * G * D:(src + 1) * G * D])


def test_splitting_a_gqa_group_changes_the_function(gqa):
    # Negative control: swapping two query heads of different KV groups (without their KV heads) is not a
    # symmetry, so the logits check above would catch a grouping bug.
    cfg, model, sd, *_ = gqa
    D = widths_of(cfg).head_dim
    bad = dict(sd)
    heads = torch.tensor([0, 2, 1, 3])  # query heads 1 (group 0) and 2 (group 1) trade places
    idx = (heads[:, None] * D + torch.arange(D)).reshape(-1)
    bad["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][idx]
    bad["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"][:, idx]
    ids = prompts()
    assert (logits(build(cfg, bad), ids) - logits(model, ids)).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------- matching


def test_self_alignment_is_identity(gqa):
    cfg, model, sd, *_ = gqa
    assert weight_matching(sd, sd, cfg).is_identity()
    assert activation_matching(model, model, [prompts()], cfg).is_identity()


def test_weight_matching_recovers_permutation(gqa):
    cfg, _, sd, perm, psd, _ = gqa
    found = weight_matching(sd, psd, cfg)
    assert found == perm.inverse()
    aligned = apply_permutation(psd, cfg, found)
    assert all(torch.equal(aligned[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_matching_half_precision_states(gqa, dtype):
    cfg, _, sd, perm, psd, _ = gqa
    half, phalf = {k: v.to(dtype) for k, v in sd.items()}, {k: v.to(dtype) for k, v in psd.items()}
    assert weight_matching(half, phalf, cfg) == perm.inverse()
    assert weight_matching(half, phalf, cfg, dtype=torch.float32) == perm.inverse()


def test_activation_matching_recovers_permutation(gqa):
    cfg, model, sd, perm, psd, pmodel = gqa
    found = activation_matching(model, pmodel, [prompts(seed=s) for s in range(2)], cfg)
    assert found == perm.inverse()
    aligned = apply_permutation(psd, cfg, found)
    assert all(torch.equal(aligned[k], sd[k]) for k in sd)


def test_activation_matching_chunked_and_padded(gqa):
    # one layer per pass (tiny stats budget) and padded batches give the same answer
    cfg, model, _, perm, _, pmodel = gqa
    ids = prompts()
    mask = torch.ones_like(ids)
    mask[0, 16:] = 0
    mask[2, :5] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}, prompts(seed=7)]
    assert activation_matching(model, pmodel, batches, cfg, max_stats_bytes=1) == perm.inverse()


@pytest.mark.parametrize("matcher", ["weights", "activations"])
def test_noisy_permuted_copy_is_aligned_back(gqa, matcher):
    cfg, model, sd, perm, _, _ = gqa
    # an "expert": the base plus noise of a quarter of the weights' scale (init std 0.1), then permuted
    expert = apply_permutation(noisy(sd, 0.025), cfg, perm)
    if matcher == "weights":
        found = weight_matching(sd, expert, cfg)
    else:
        found = activation_matching(model, build(cfg, expert), [prompts(seed=s) for s in range(2)], cfg)
    assert found == perm.inverse()
    aligned = apply_permutation(expert, cfg, found)
    layer_names = [k for k in sd if ".layers." in k]
    before, after = task_vector_norm(sd, expert, layer_names), task_vector_norm(sd, aligned, layer_names)
    # aligned, the task vector is the noise alone (≈ 0.025/0.1·√2 ≈ 0.18 of the unaligned one here)
    assert after < 0.3 * before, (before, after)


# ---------------------------------------------------------------------------------------------------- caching


def test_cache_round_trip(tmp_path, gqa):
    cfg, *_ , perm, _, _ = gqa
    path = tmp_path / "align.safetensors"
    save_permutations(path, {"./math": perm, "org/code": perm.inverse()}, {"align": "weights"})
    got, meta = load_permutations(path, cfg)
    assert list(got) == ["./math", "org/code"] and meta == {"align": "weights"}
    assert got["./math"] == perm and got["org/code"] == perm.inverse()
    with pytest.raises(ModelError, match="made for other widths: intermediate_size is 64 vs 128") as e:
        load_permutations(path, tiny_config(intermediate_size=128))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ModelError, match="cannot read"):
        load_permutations(tmp_path / "junk.safetensors", cfg)


# -------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("over", "field"), [
    ({"hidden_size": 64}, "hidden_size"),
    ({"intermediate_size": 128}, "intermediate_size"),
    ({"num_attention_heads": 8}, "num_attention_heads"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"head_dim": 16}, "head_dim"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
])
def test_different_widths_one_line_naming_field(over, field):
    with pytest.raises(ModelError, match=f"different widths: {field} ") as e:
        check_alignable(tiny_config(), tiny_config(**over))
    assert "\n" not in str(e.value)


def test_activation_matching_refuses_other_widths(gqa):
    _, model, *_ = gqa
    other = build(tiny_config(intermediate_size=128))
    with pytest.raises(ModelError, match="intermediate_size is 64 vs 128"):
        activation_matching(model, other, [prompts()])


def test_unsupported_model_type_one_line():
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4)
    for call in (lambda: check_alignable(gpt2, tiny_config()), lambda: weight_matching({}, {}, gpt2),
                 lambda: ModelPermutation.identity({"model_type": "phi3", "hidden_size": 32})):
        with pytest.raises(ModelError, match="does not support model_type") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="'gpt2'"):
        widths_of(gpt2)


def test_bad_states_and_permutations(gqa):
    cfg, model, sd, perm, *_ = gqa
    missing = {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ModelError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        apply_permutation(missing, cfg, perm)
    bias = "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(ModelError, match=f"state has no tensor '{bias}'"):  # a bias in one state only
        weight_matching({**sd, bias: torch.zeros(32)}, sd, cfg)
    with pytest.raises(ModelError, match="has shape"):
        weight_matching(sd, {**sd, "model.layers.0.mlp.gate_proj.weight": torch.zeros(3, 3)}, cfg)
    with pytest.raises(ModelError, match=r"layers\.0\.attn: not a permutation"):
        ModelPermutation(widths_of(cfg), (LayerPermutation(torch.arange(64), torch.tensor([1, 1])),
                                          LayerPermutation(torch.arange(64), torch.arange(2))))
    with pytest.raises(ModelError, match="does not fit the model: num_hidden_layers is 2 vs 3"):
        apply_permutation(sd, tiny_config(num_hidden_layers=3), perm)
    with pytest.raises(ModelError, match="permutation has 1 layers, the model has 2"):
        ModelPermutation(widths_of(cfg), perm.layers[:1])
    with pytest.raises(ModelError, match=r"has no module 'model\.layers\.0\.self_attn\.o_proj'"):
        activation_matching(model.model, model.model, [prompts()], cfg)  # the bare decoder, not the LM
    with pytest.raises(DataError, match="at least two"):
        activation_matching(model, model, [])
    with pytest.raises(DataError, match="input_ids of shape"):
        activation_matching(model, model, [torch.zeros(5, dtype=torch.long)])
