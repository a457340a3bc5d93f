"""The router separates the demo's tasks from the shared model's pooled prompt states, deterministically."""

from __future__ import annotations

import time

import pytest
import torch

from mergesearch.errors import ConfigError, DataError
from mergesearch.twin.factors import compute_factors
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import RouterSettings, routing_mask, train_router
from tests.twin.conftest import EXPERTS


def splits(n: int) -> tuple[list[list[str]], list[tuple[int, dict[str, str]]]]:
    """Training prompts per task (search split) and labelled held-out examples (test split)."""
    from mergesearch.demo.tasks import eval_splits

    train, held_out = [], []
    for t, task in enumerate(EXPERTS):
        search, test = eval_splits(task, seed=0, length=4, n_search=n, n_test=n)
        train.append([r["prompt"] for r in search])
        held_out += [(t, r) for r in test]
    return train, held_out


def test_router_accuracy_on_held_out_teacher_forced_examples(merger):
    from mergesearch.objectives.scoring import encode_continuation, pad, pad_id

    train, held_out = splits(64)
    start = time.perf_counter()
    router = train_router(merger.model, merger.tokenizer, train, seed=0)
    print(f"\nrouter: {time.perf_counter() - start:.2f}s for {sum(map(len, train))} prompts, "
          f"train accuracy {router.train_accuracy:.3f}")
    tok = merger.tokenizer
    # as the exact-match objective calls a model: prompt+answer+EOS in one batch, no task label, no lengths
    seqs = [tok(r["prompt"])["input_ids"] + encode_continuation(tok, r["answer"], eos=True) for _, r in held_out]
    ids, mask, pos, _ = pad(seqs, pad_id(tok), "right", torch.device("cpu"))
    with RoutedModel(merger.model, compute_factors(merger, 2), router) as routed:
        chosen = routed.route(ids, mask, pos).argmax(-1)
    labels = torch.tensor([t for t, _ in held_out])
    accuracy = float((chosen == labels).float().mean())
    assert accuracy >= 0.9, accuracy
    assert router.train_accuracy >= 0.9
    # the test can fail: pooling only <bos> (window 1) sees no task and scores chance on its own training set
    blind = train_router(merger.model, merger.tokenizer, train, RouterSettings(window=1, steps=50), seed=0)
    assert blind.train_accuracy < 0.5


def test_router_is_seeded_and_deterministic(merger):
    train, _ = splits(16)
    settings = RouterSettings(steps=20, width=16)
    a = train_router(merger.model, merger.tokenizer, train, settings, seed=3)
    b = train_router(merger.model, merger.tokenizer, train, settings, seed=3)
    c = train_router(merger.model, merger.tokenizer, train, settings, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    torch.manual_seed(0)  # the caller's random stream is untouched by training
    x = torch.randn(3)
    torch.manual_seed(0)
    train_router(merger.model, merger.tokenizer, train, settings, seed=3)
    assert torch.equal(torch.randn(3), x)


def test_routing_mask_takes_the_leading_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])  # left- and right-padded rows
    assert routing_mask(mask, 2).long().tolist() == [[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert routing_mask(mask, None, [3, 1]).long().tolist() == [[0, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0]]
    assert torch.equal(routing_mask(mask), mask.bool())


def test_router_bad_inputs(merger):
    with pytest.raises(ConfigError, match="at least two experts"):
        train_router(merger.model, merger.tokenizer, [["<sort> 1 ="]])
    with pytest.raises(DataError, match="no training prompts for expert 1"):
        train_router(merger.model, merger.tokenizer, [["<sort> 1 ="], []])
    with pytest.raises(ConfigError, match="window"):
        train_router(merger.model, merger.tokenizer, [["<sort> 1 ="], ["<swap> 1 ="]], RouterSettings(window=0))
