"""The demo's synthetic digit-string tasks and their deterministic example sets.

An example is ``{"prompt": "<reverse> 3 1 4 1 5 =", "answer": "5 1 4 1 3"}``: a task token, the input digits
and ``=``; the answer is the task's output digits. The tokenizer prepends ``<bos>``; training and scoring append
``<eos>`` after the answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

Digits = tuple[int, ...]

#: Each task maps input digits to output digits.
TASKS: dict[str, Callable[[Digits], Digits]] = {
    "reverse": lambda d: d[::-1],
    "swap": lambda d: tuple(d[i ^ 1] if (i ^ 1) < len(d) else d[i] for i in range(len(d))),
    "sort": lambda d: tuple(sorted(d)),
    "copy": lambda d: d,
    "rotate": lambda d: d[2:] + d[:2],
    "desc": lambda d: tuple(sorted(d, reverse=True)),
    "min": lambda d: (min(d),),
}
#: The tasks that get an expert each, and the generic tasks replayed while fine-tuning them.
EXPERT_TASKS = ("reverse", "swap", "sort")
REPLAY_TASKS = ("copy", "rotate", "desc", "min")


def task_token(task: str) -> str:
    """The vocabulary symbol announcing ``task`` (e.g. ``<reverse>``)."""
    return f"<{task}>"


def make_example(task: str, digits: Digits) -> dict[str, str]:
    """The JSONL record of ``task`` applied to ``digits``."""
    prompt = " ".join([task_token(task), *map(str, digits), "="])
    return {"prompt": prompt, "answer": " ".join(map(str, TASKS[task](digits)))}


def _draw(rng: random.Random, length: int) -> Digits:
    return tuple(rng.randrange(10) for _ in range(length))


def eval_splits(task: str, *, seed: int, length: int, n_search: int = 128,
                n_test: int = 512) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The search and held-out test examples of ``task``: distinct inputs, disjoint splits.

    Args:
        task: a key of :data:`TASKS`.
        seed: the data seed; the same seed always gives the same examples.
        length: digits per input (10**length distinct inputs must exceed ``n_search + n_test``).
        n_search: examples in the search split.
        n_test: examples in the test split.

    Returns:
        ``(search, test)`` lists of records.
    """
    rng = random.Random(f"{seed}:{task}:eval")  # str seeds hash with sha512: stable across runs
    seen: dict[Digits, None] = {}
    while len(seen) < n_search + n_test:
        seen.setdefault(_draw(rng, length))
    inputs = list(seen)
    records = [make_example(task, d) for d in inputs]
    return records[:n_search], records[n_search:]


def held_out_inputs(*, seed: int, length: int, tasks: Sequence[str] = EXPERT_TASKS) -> set[Digits]:
    """All evaluation inputs of ``tasks`` (training batches avoid them)."""
    out: set[Digits] = set()
    for task in tasks:
        search, test = eval_splits(task, seed=seed, length=length)
        out.update(tuple(int(c) for c in r["prompt"].split()[1:-1]) for r in search + test)
    return out


def sample_examples(task: str, n: int, rng: random.Random, *, length: int,
                    exclude: Collection[Digits] = frozenset()) -> list[dict[str, str]]:
    """``n`` fresh training records of ``task`` drawn from ``rng``, none with an input in ``exclude``."""
    out = []
    while len(out) < n:
        d = _draw(rng, length)
        if d not in exclude:
            out.append(make_example(task, d))
    return out


def write_jsonl(path: Path, records: Sequence[dict[str, str]]) -> None:
    """Write one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Read the records written by :func:`write_jsonl`."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
