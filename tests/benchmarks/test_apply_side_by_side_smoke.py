"""Pure helpers of benchmarks/apply_side_by_side.py and its harness (side_by_side.py): the engines take turns
going first, and the weights' digest tells any changed bit (no worker processes)."""

from __future__ import annotations

import torch

from tests.benchmarks.script import load_script


def test_digest_tells_one_changed_bit_and_ignores_nothing() -> None:
    aps = load_script("apply_side_by_side")
    state = {"a": torch.randn(5, 3), "b": torch.randn(4).to(torch.bfloat16)}
    before = aps.digest(state)
    assert aps.digest({k: v.clone() for k, v in state.items()}) == before
    state["b"].view(torch.int16)[2] ^= 1  # the lowest bit of one bfloat16 entry
    assert aps.digest(state) != before
    assert aps.digest({"c": state["a"], "b": state["b"]}) != aps.digest(state)  # names count too


def _stamp(tag: str, conn) -> None:
    """A worker answering each message with (its tag, the time it was asked)."""
    import time

    conn.send(("ready", tag))
    while conn.recv() is not None:
        conn.send((tag, time.monotonic_ns()))


def test_the_pair_asks_both_in_turn_and_stops() -> None:
    sbs = load_script("side_by_side")
    pair = sbs.Pair(_stamp, {name: (name,) for name in sbs.NAMES})
    try:
        assert pair.both(None) == {name: ("ready", name) for name in sbs.NAMES}
        answers = pair.rounds("go", 4)
        assert all(tag == name for name in sbs.NAMES for tag, _ in answers[name])
        firsts = [min(sbs.NAMES, key=lambda n, r=r: answers[n][r][1]) for r in range(4)]
        assert firsts == [*sbs.NAMES, *sbs.NAMES]  # the two take turns going first
    finally:
        pair.stop()
    assert all(not proc.is_alive() for proc in pair.procs)
