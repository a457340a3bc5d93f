"""Two engines, each in a process of its own, asked in turn round after round: the harness of the side-by-side
benchmarks (``kernel_side_by_side.py``, ``apply_side_by_side.py``). One process cannot hold two revisions of
the engine (numba links two modules' generated functions, which share names, to one implementation), and two
separate runs on this shared machine differ by more than most changes."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

NAMES = ("baseline", "this tree")


def turns(r: int) -> tuple[str, ...]:
    """Who goes first in round r: the two take turns (with a fixed order, two identical kernels read up to 1.4×
    apart, in favour of the second)."""
    return NAMES[::-1] if r % 2 else NAMES


class Pair:
    """The two worker processes: ``worker(*args[name], conn)`` each (spawned), answering messages on ``conn``."""

    def __init__(self, worker: Callable[..., None], args: dict[str, tuple]) -> None:
        ctx = mp.get_context("spawn")
        self.conns: dict[str, Any] = {}
        self.procs = []
        for name in NAMES:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(*args[name], there), daemon=True)
            proc.start()
            self.conns[name] = here
            self.procs.append(proc)

    def ask(self, name: str, msg: Any) -> Any:
        self.conns[name].send(msg)
        return self.conns[name].recv()

    def both(self, msg: Any) -> dict[str, Any]:
        """Each one's answer to ``msg`` (None: the first message each sends by itself)."""
        return {name: self.ask(name, msg) if msg is not None else self.conns[name].recv() for name in NAMES}

    def rounds(self, msg: Any, n: int, before: Callable[[], None] | None = None) -> dict[str, list]:
        """``n`` rounds of ``msg`` to both, taking turns going first (``before`` runs at the start of each)."""
        answers: dict[str, list] = {name: [] for name in NAMES}
        for r in range(n):
            if before is not None:
                before()
            for name in turns(r):
                answers[name].append(self.ask(name, msg))
        return answers

    def stop(self) -> None:
        for conn in self.conns.values():
            conn.send(None)
        for proc in self.procs:
            proc.join()
