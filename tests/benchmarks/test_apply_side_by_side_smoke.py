"""Pure helpers of benchmarks/apply_side_by_side.py: the engines take turns going first, and the weights' digest
tells any changed bit (no worker processes)."""

from __future__ import annotations

import torch

from tests.benchmarks.script import load_script


def test_the_engines_take_turns_going_first() -> None:
    aps = load_script("apply_side_by_side")
    firsts = [aps.turns(r)[0] for r in range(aps.CONFIG["rounds"])]
    assert sorted(firsts) == sorted(aps.NAMES * (aps.CONFIG["rounds"] // 2))
    assert all(sorted(aps.turns(r)) == sorted(aps.NAMES) for r in range(4))


def test_digest_tells_one_changed_bit_and_ignores_nothing() -> None:
    aps = load_script("apply_side_by_side")
    state = {"a": torch.randn(5, 3), "b": torch.randn(4).to(torch.bfloat16)}
    before = aps.digest(state)
    assert aps.digest({k: v.clone() for k, v in state.items()}) == before
    state["b"].view(torch.int16)[2] ^= 1  # the lowest bit of one bfloat16 entry
    assert aps.digest(state) != before
    assert aps.digest({"c": state["a"], "b": state["b"]}) != aps.digest(state)  # names count too
