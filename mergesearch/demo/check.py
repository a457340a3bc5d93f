"""Token layout of the demo's examples and a one-pass greedy exact-match check.

Both training and scoring use :func:`encode`, so they see exactly the layout ``<bos> prompt answer <eos>``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergesearch.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from mergesearch.demo.build import DemoPaths

IGNORE = -100


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-file progress bars (loading/saving a tiny model many times)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def encode(tokenizer: PreTrainedTokenizerBase,
           records: Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids and labels for a batch of prompt/answer records.

    Args:
        tokenizer: the demo tokenizer (adds ``<bos>`` to the prompt).
        records: dicts with ``prompt`` and ``answer``.

    Returns:
        ``(input_ids, labels)``, both ``(batch, max_len)`` long tensors; labels are the answer tokens and
        ``<eos>`` at their own positions and ``-100`` elsewhere (the model shifts them).
    """
    prompts = tokenizer([r["prompt"] for r in records])["input_ids"]
    answers = tokenizer([r["answer"] for r in records], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    seqs = [p + a + [eos] for p, a in zip(prompts, answers, strict=True)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    labels = torch.tensor([[IGNORE] * len(p) + s[len(p) :] + [IGNORE] * (width - len(s))
                           for p, s in zip(prompts, seqs, strict=True)])
    return ids, labels


@torch.inference_mode()
def exact_match(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                records: Sequence[dict[str, str]]) -> float:
    """Greedy exact-match accuracy (answer then ``<eos>``) from one teacher-forced forward pass.

    Greedy decoding reproduces the answer iff every answer token is the argmax given its prefix. Right
    padding needs no attention mask: causal attention never lets a real token see the padding after it.

    Returns:
        The fraction of records answered exactly, in [0, 1].
    """
    ids, labels = encode(tokenizer, records)
    pred = model(input_ids=ids).logits[:, :-1].argmax(-1)  # (batch, len-1): prediction of token t+1
    target = labels[:, 1:]
    ok = (pred == target) | (target == IGNORE)
    return ok.all(dim=1).float().mean().item()


def task_vector_merge(base: dict[str, torch.Tensor], experts: Sequence[dict[str, torch.Tensor]],
                      weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``θ0 + Σ w_i (θ_i − θ0)`` over state dicts (a reference merge, independent of the merge engine).

    Weights ``1/n`` give the uniform average of the experts; all weights ``λ`` give task arithmetic.
    """
    return {k: v + sum(w * (e[k] - v) for w, e in zip(weights, experts, strict=True)) for k, v in base.items()}


#: Merges whose test accuracies show the demo's trade-off (weights for the reverse, swap, sort experts).
REFERENCE_MERGES = {
    "uniform average": (1 / 3, 1 / 3, 1 / 3),
    "task arithmetic λ=0.5": (0.5, 0.5, 0.5),
    "task arithmetic λ=1.0": (1.0, 1.0, 1.0),
    "w = (.8, .4, 0)": (0.8, 0.4, 0.0),
    "w = (.3, .8, .2)": (0.3, 0.8, 0.2),
    "w = (.2, .2, .8)": (0.2, 0.2, 0.8),
}


def tradeoff_table(root: str | Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Exact match of base, experts and :data:`REFERENCE_MERGES` on every expert task of a demo build.

    Args:
        root: a directory written by :func:`mergesearch.demo.build.build_demo`.
        split: ``test`` (held out, 512 per task) or ``search`` (128 per task).

    Returns:
        Row label -> task -> accuracy.
    """
    from mergesearch.demo.build import demo_paths

    if split not in ("test", "search"):
        raise DataError(f"demo split must be 'test' or 'search', got {split!r}")
    with quiet_transformers():
        return _tradeoff_table(demo_paths(Path(root)), split)


def _tradeoff_table(paths: DemoPaths, split: str) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.demo.tasks import EXPERT_TASKS, read_jsonl

    files = paths.test if split == "test" else paths.data
    data = {t: read_jsonl(files[t]) for t in EXPERT_TASKS}
    tok = AutoTokenizer.from_pretrained(paths.base)
    model = AutoModelForCausalLM.from_pretrained(paths.base).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [AutoModelForCausalLM.from_pretrained(paths.experts[t]).state_dict() for t in EXPERT_TASKS]
    states = {"base": base, **{f"expert {t}": e for t, e in zip(EXPERT_TASKS, experts, strict=True)}}
    states.update({label: task_vector_merge(base, experts, w) for label, w in REFERENCE_MERGES.items()})
    rows = {}
    for label, state in states.items():
        model.load_state_dict(state)
        rows[label] = {t: exact_match(model, tok, data[t]) for t in EXPERT_TASKS}
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mergesearch.demo.check DIR [search|test]``: print the trade-off table of a demo build."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    rows = tradeoff_table(args[0], *args[1:2])
    tasks = list(next(iter(rows.values())))
    print(f"| model | {' | '.join(tasks)} |\n|---|{'---|' * len(tasks)}")
    for label, accs in rows.items():
        print(f"| {label} | {' | '.join(f'{accs[t]:.2f}' for t in tasks)} |")


if __name__ == "__main__":
    main()
