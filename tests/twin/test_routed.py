"""The routed model: oracle routing at full rank is each expert, rank 0 is the shared model, half precision
stays close, and routing depends on the prompt only (teacher forcing equals greedy decoding)."""

from __future__ import annotations

import pytest
import torch

from mergesearch.errors import ConfigError
from mergesearch.twin.factors import compute_factors
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import RouterSettings, train_router
from tests.twin.conftest import EXPERTS, batch, make_merger, prompts

TEXTS = ["<reverse> 1 2 3 4 =", "<sort> 9 8 =", "<swap> 5 0 5 1 2 6 =", "<reverse> 7 =", "<sort> 3 1 4 1 5 ="]


def expert_logits(path, ids, mask, pos, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


@pytest.mark.parametrize("side", ["right", "left"])
def test_full_rank_oracle_reproduces_each_expert(twin_models, merger, side):
    ids, mask, pos = batch(merger.tokenizer, TEXTS, side)
    real = mask.bool()
    with torch.no_grad():
        shared = merger.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with RoutedModel(merger.model, compute_factors(merger, 32)) as routed, torch.no_grad():
        for t, task in enumerate(EXPERTS):
            want = expert_logits(twin_models[task], ids, mask, pos)
            got = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=task).logits
            torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
            assert (shared[real] - want[real]).abs().max() > 0.05  # the experts really differ from θ*
            one_hot = torch.zeros(len(TEXTS), 3)
            one_hot[:, t] = 1
            assert torch.equal(routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=one_hot).logits,
                               got)


def test_per_example_alpha_mixes_rows_independently(merger):
    ids, mask, pos = batch(merger.tokenizer, TEXTS[:3])
    with RoutedModel(merger.model, compute_factors(merger, 8)) as routed, torch.no_grad():
        alpha = torch.tensor([[1.0, 0, 0], [0.2, 0.5, 0.3], [0, 0, 1]])
        mixed = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=alpha).logits
        for row in range(3):
            alone = routed(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1],
                           position_ids=pos[row : row + 1], alpha=alpha[row : row + 1]).logits
            n = int(mask[row].sum())
            torch.testing.assert_close(mixed[row, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def test_rank_zero_is_the_shared_model(merger):
    ids, mask, pos = batch(merger.tokenizer, TEXTS)
    f = compute_factors(merger, 0)
    assert f.num_params() == 0
    with torch.no_grad():
        shared = merger.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with RoutedModel(merger.model, f) as routed, torch.no_grad():
        got = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=torch.full((5, 3), 1 / 3)).logits
    assert torch.equal(got, shared)


def test_hooks_are_inert_outside_routed_calls_and_removed_by_detach(merger):
    ids, mask, pos = batch(merger.tokenizer, TEXTS)
    with torch.no_grad():
        before = merger.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        routed = RoutedModel(merger.model, compute_factors(merger, 4))
        routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=0)
        assert torch.equal(merger.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits, before)
        routed.detach()
    assert not any(m._forward_hooks for m in merger.model.modules())
    with pytest.raises(RuntimeError, match="detached"):
        routed(input_ids=ids, alpha=0)
    with RoutedModel(merger.model, compute_factors(merger, 1)) as plain:
        with pytest.raises(ConfigError, match="no router"):
            plain(input_ids=ids)
        with pytest.raises(ConfigError, match="unknown twin expert"):
            plain(input_ids=ids, alpha="chess")
        with pytest.raises(ConfigError, match=r"alpha must be \[batch, experts\]"):
            plain(input_ids=ids, alpha=torch.ones(2, 3))


@pytest.fixture(scope="module")
def routed(merger):
    """Rank-8 factors and a router trained on 48 prompts per task."""
    router = train_router(merger.model, merger.tokenizer, [prompts(t, 48) for t in EXPERTS],
                          RouterSettings(steps=150), seed=0)
    model = RoutedModel(merger.model, compute_factors(merger, 8), router)
    yield model
    model.detach()


def test_routing_ignores_the_answer_in_teacher_forcing(merger, routed):
    """With no prompt length given, α comes from the leading window, which lies inside every prompt."""
    from mergesearch.demo.tasks import eval_splits

    rows = eval_splits("swap", seed=1, length=4, n_search=4, n_test=0)[0]
    tok = merger.tokenizer
    full = [tok(r["prompt"])["input_ids"] + tok(r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
    wrong = [f[:7] + [tok.convert_tokens_to_ids("9")] * (len(f) - 7) for f in full]  # other answers
    lengths = [len(tok(r["prompt"])["input_ids"]) for r in rows]
    assert routed.router.window == 7 <= min(lengths)
    from mergesearch.objectives.scoring import pad

    a, m, _, _ = pad(full, 0, "right", torch.device("cpu"))
    b, _, _, _ = pad(wrong, 0, "right", torch.device("cpu"))
    alpha = routed.route(a, m)
    assert torch.equal(alpha, routed.route(b, m))
    assert torch.equal(alpha, routed.route(a, m, prompt_lengths=lengths))


def test_greedy_generation_equals_teacher_forced_argmax(merger, routed):
    """``generate`` keeps each row's α for every step, so the objectives' one-pass exact match stays exact."""
    from mergesearch.objectives.scoring import pad, pad_id, score_continuations

    tok = merger.tokenizer
    texts = [p for t in EXPERTS for p in prompts(t, 3, seed=2)]
    ids = [tok(t)["input_ids"] for t in texts]
    left, mask, _, _ = pad(ids, pad_id(tok), "left", torch.device("cpu"))
    new = routed.generate(left, mask, max_new_tokens=5, do_sample=False, pad_token_id=pad_id(tok),
                          eos_token_id=tok.eos_token_id)[:, left.shape[1] :]
    requests = []
    for row, prompt in enumerate(ids):
        cont = new[row].tolist()
        cont = cont[: cont.index(tok.eos_token_id) + 1] if tok.eos_token_id in cont else cont
        requests.append((prompt, cont))
    scores = score_continuations(routed, requests, pad_token=pad_id(tok), batch_size=4)
    assert all(s.greedy for s in scores)
    # and the router did not send every prompt to one expert (else this would test nothing about α)
    with torch.no_grad():
        chosen = routed.route(left, mask).argmax(-1)
    assert len(set(chosen.tolist())) == 3


def test_bfloat16_full_rank_oracle_is_finite_and_close(twin_models, merger):
    merger16 = make_merger(twin_models, "bfloat16")
    ids, mask, pos = batch(merger16.tokenizer, TEXTS)
    real = mask.bool()
    f16 = compute_factors(merger16, 32)
    f32 = compute_factors(merger, 32)
    for m in f16.modules:  # factors are float32 whatever the model dtype, and close to the float32 ones'
        assert f16.A[m].dtype == torch.float32
        torch.testing.assert_close(f16.delta(0, m), f32.delta(0, m), atol=2e-2, rtol=0)
    with RoutedModel(merger16.model, f16) as routed, torch.no_grad():
        for task in EXPERTS:
            got = routed(input_ids=ids, attention_mask=mask, position_ids=pos, alpha=task).logits
            assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
            want = expert_logits(twin_models[task], ids, mask, pos).float()  # the float32 expert
            err = (got.float()[real] - want[real]).abs().max()
            assert err < 0.05 * want[real].abs().max(), float(err)


def test_objectives_score_the_routed_model_without_task_labels(merger, routed, tmp_path):
    """The exact-match and loglik objectives take a routed model as they take a HF model."""
    import json

    from mergesearch.config import ObjectiveConfig
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate
    from mergesearch.objectives.scoring import pad, pad_id

    tok = merger.tokenizer
    texts = [p for t in EXPERTS for p in prompts(t, 4, seed=3)]
    ids, mask, _, _ = pad([tok(t)["input_ids"] for t in texts], pad_id(tok), "left", torch.device("cpu"))
    new = routed.generate(ids, mask, max_new_tokens=3, do_sample=False, pad_token_id=pad_id(tok))[:, ids.shape[1] :]
    rows = []
    for text, out in zip(texts, new.tolist(), strict=True):
        words = [tok.convert_ids_to_tokens(i) for i in out]
        words = words[: next((k for k, w in enumerate(words) if w.startswith("<")), len(words))]
        if words:  # the routed model's own greedy answer, cut before any special token
            rows.append({"prompt": text, "answer": " ".join(words)})
    assert len(rows) >= 6
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    objectives = build_objectives([ObjectiveConfig.model_validate(c) for c in (
        {"type": "exact_match", "name": "em", "data": str(data), "eos": False, "batch_size": 5},
        {"type": "loglik", "name": "ll", "data": str(data)})], ObjectiveContext())
    scores = evaluate(objectives, routed, tok)
    assert scores["em"] == 1.0 and scores["ll"] < 0
