"""Build the demo's base model and three task experts on the CPU, deterministically and cached.

The recipe (see DEMO_NOTES.md) keeps base and experts in the "local" regime where merging works: the base is
trained briefly on all seven tasks so it half-knows each, then every expert is fine-tuned from it at a small
learning rate on its own task with 50% replay of the generic tasks. The experts then excel at their own task,
their uniform average is clearly worse, and different merge weights favour different tasks.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergesearch.demo.check import encode, exact_match, quiet_transformers
from mergesearch.demo.tasks import (
    EXPERT_TASKS,
    REPLAY_TASKS,
    TASKS,
    eval_splits,
    held_out_inputs,
    read_jsonl,
    sample_examples,
    task_token,
    write_jsonl,
)
from mergesearch.demo.tokenizer import build_tokenizer
from mergesearch.errors import MergeSearchError

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: Bump when the recipe or the file layout changes: cached builds of another version are rebuilt.
VERSION = 1
#: One torch thread: on 2 shared cores a second thread mostly waits (measured in the report).
THREADS = 1
MARKER = "build.json"


@dataclass(frozen=True)
class Recipe:
    """Sizes and schedules of one demo variant."""

    length: int  # digits per input
    layers: int
    hidden: int = 64
    base_steps: int = 250
    base_lr: float = 1e-3  # constant after warm-up: a decayed base merges poorly
    base_warmup: int = 20
    base_per_task: int = 16  # examples of every task per step
    expert_steps: int = 250
    expert_lr: float = 1e-4  # cosine to expert_lr / 10 after warm-up
    expert_warmup: int = 10
    expert_own: int = 32  # own-task examples per step ...
    expert_replay: int = 8  # ... plus this many of every replay task


FULL = Recipe(length=5, layers=4)
FAST = Recipe(length=4, layers=2, base_steps=200, expert_steps=100, expert_lr=5e-4)


@dataclass(frozen=True)
class DemoPaths:
    """Where a demo build lives."""

    root: Path
    base: Path
    experts: dict[str, Path]  # task -> HF model dir
    data: dict[str, Path]  # task -> search split (JSONL)
    test: dict[str, Path]  # task -> held-out test split (JSONL)
    config: Path  # job YAML with paths relative to root
    #: test-split exact match: model ("base" or a task) -> task -> accuracy, measured at build time.
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)


def demo_paths(out_dir: Path, accuracy: dict[str, dict[str, float]] | None = None) -> DemoPaths:
    """The layout of a build in ``out_dir`` (whether or not it exists yet)."""
    root = Path(out_dir)
    return DemoPaths(
        root=root,
        base=root / "base",
        experts={t: root / "experts" / t for t in EXPERT_TASKS},
        data={t: root / "data" / f"{t}.jsonl" for t in EXPERT_TASKS},
        test={t: root / "data" / f"{t}_test.jsonl" for t in EXPERT_TASKS},
        config=root / "demo.yaml",
        accuracy=accuracy or {},
    )


def _settings(seed: int, recipe: Recipe) -> dict:
    return {"version": VERSION, "seed": seed, "recipe": asdict(recipe)}


def _cached(paths: DemoPaths, settings: dict) -> dict | None:
    marker = paths.root / MARKER
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return saved if {k: saved.get(k) for k in settings} == settings else None


def _new_model(tok: PreTrainedTokenizerFast, recipe: Recipe) -> LlamaForCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden, intermediate_size=2 * recipe.hidden,
        num_hidden_layers=recipe.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=16, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


def _train(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, steps: int,
           batch: Callable[[], list[dict[str, str]]], lr: Callable[[int], float]) -> float:
    """Full fine-tuning with AdamW (0.9, 0.98), no weight decay, clip 1.0; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr(0), betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr(step)
        ids, labels = encode(tok, batch())
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return loss.item()


def _warmup_cosine(peak: float, warmup: int, steps: int, floor: float) -> Callable[[int], float]:
    def lr(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup - 1)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * frac))

    return lr


def _save(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def build_demo(out_dir: Path, *, seed: int = 0, fast: bool = False, force: bool = False,
               progress: Callable[[str], None] | None = None, recipe: Recipe | None = None) -> DemoPaths:
    """Build (or reuse) the demo base, its three experts, their data and the demo job config.

    Writes ``out_dir/base`` and ``out_dir/experts/{reverse,swap,sort}`` (Hugging Face dirs: safetensors and
    tokenizer), ``out_dir/data/{task}.jsonl`` (128 search examples), ``out_dir/data/{task}_test.jsonl`` (512
    held-out examples, disjoint inputs), ``out_dir/demo.yaml`` and, last, the marker ``out_dir/build.json``.

    Args:
        out_dir: the build directory (created if missing).
        seed: seeds the model initialisation and all data; the same seed gives identical files.
        fast: the small variant (4 digits, 2 layers, ~15 s) used by the tests.
        force: rebuild even if a complete build with the same settings exists.
        progress: called with one-line status messages.
        recipe: sizes and schedules overriding ``fast`` (tests use tiny ones).

    Returns:
        The paths of the build, with the test-split accuracies of base and experts.

    Raises:
        MergeSearchError: if ``out_dir`` is an existing file.
    """
    say = progress or (lambda _msg: None)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise MergeSearchError(f"{out_dir}: demo output path exists and is not a directory")
    recipe = recipe or (FAST if fast else FULL)
    paths = demo_paths(out_dir)
    settings = _settings(seed, recipe)
    saved = None if force else _cached(paths, settings)
    if saved is not None:
        say(f"demo models already built in {paths.root}")
        return demo_paths(out_dir, saved["accuracy"])

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with quiet_transformers():
            accuracy = _build(paths, seed, recipe, say)
    finally:
        torch.set_num_threads(threads)
    (paths.root / MARKER).write_text(json.dumps({**settings, "accuracy": accuracy}, indent=1) + "\n")
    return demo_paths(out_dir, accuracy)


def _build(paths: DemoPaths, seed: int, recipe: Recipe,
           say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / MARKER).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    for task in EXPERT_TASKS:
        search, test = eval_splits(task, seed=seed, length=recipe.length)
        write_jsonl(paths.data[task], search)
        write_jsonl(paths.test[task], test)
    exclude = held_out_inputs(seed=seed, length=recipe.length)
    tok = build_tokenizer([task_token(t) for t in TASKS])

    torch.manual_seed(seed)
    base = _new_model(tok, recipe)
    say(f"training the base ({sum(p.numel() for p in base.parameters()):,} parameters) on {len(TASKS)} tasks")
    rng = random.Random(f"{seed}:train:base")
    loss = _train(
        base, tok, recipe.base_steps,
        lambda: [r for t in TASKS for r in sample_examples(t, recipe.base_per_task, rng,
                                                            length=recipe.length, exclude=exclude)],
        lambda s: recipe.base_lr * min(1.0, (s + 1) / recipe.base_warmup),
    )
    _save(base, tok, paths.base)
    say(f"base done (loss {loss:.3f}, {time.perf_counter() - start:.0f} s)")

    models = {"base": base}
    for task in EXPERT_TASKS:
        expert = copy.deepcopy(base)
        rng = random.Random(f"{seed}:train:{task}")
        loss = _train(
            expert, tok, recipe.expert_steps,
            lambda t=task, rng=rng: [
                *sample_examples(t, recipe.expert_own, rng, length=recipe.length, exclude=exclude),
                *(r for g in REPLAY_TASKS
                  for r in sample_examples(g, recipe.expert_replay, rng, length=recipe.length,
                                           exclude=exclude)),
            ],
            _warmup_cosine(recipe.expert_lr, recipe.expert_warmup, recipe.expert_steps, recipe.expert_lr / 10),
        )
        _save(expert, tok, paths.experts[task])
        models[task] = expert
        say(f"expert {task} done (loss {loss:.3f}, {time.perf_counter() - start:.0f} s)")

    tests = {t: read_jsonl(paths.test[t]) for t in EXPERT_TASKS}
    accuracy = {m: {t: round(exact_match(model, tok, tests[t]), 4) for t in EXPERT_TASKS}
                for m, model in models.items()}
    write_demo_config(paths.root)
    say(f"demo built in {time.perf_counter() - start:.0f} s: {paths.root}")
    return accuracy


def write_demo_config(out_dir: Path, *, path: Path | None = None, trials: int = 40) -> Path:
    """Write the demo's job YAML for a build in ``out_dir``.

    Args:
        out_dir: the demo build directory (it need not exist yet).
        path: where to write; default ``out_dir/demo.yaml``. Paths in the YAML are relative to its folder.
        trials: the search budget.

    Returns:
        The written file.
    """
    target = Path(path) if path is not None else Path(out_dir) / "demo.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(demo_config_yaml(Path(out_dir), target.parent, trials=trials))
    return target


def demo_config_yaml(out_dir: Path, config_dir: Path, *, trials: int = 40) -> str:
    """The text of the demo job YAML for a build in ``out_dir``, with paths relative to ``config_dir``."""
    import yaml

    paths = demo_paths(out_dir)

    def rel(p: Path) -> str:
        r = Path(os.path.relpath(os.path.abspath(p), os.path.abspath(config_dir))).as_posix()
        return r if r.startswith("../") else f"./{r}"  # "./base", never a bare name that looks like a hub id

    objectives: list[dict] = [
        {"type": "exact_match", "name": t, "data": rel(paths.data[t]), "test": rel(paths.test[t]), "limit": 128}
        for t in EXPERT_TASKS
    ]
    objectives.append({"type": "l1_from_base", "name": "l1"})
    config = {
        "base_model": rel(paths.base),
        "models": [rel(paths.experts[t]) for t in EXPERT_TASKS],
        "space": {"methods": ["task_arithmetic"], "granularity": "global", "weight": [0.0, 1.0]},
        "objectives": objectives,
        # two hand-tuned recipes evaluated first (the plain uniform average and "half of each expert"); the
        # last quarter of the budget polishes the front around them until it strictly dominates both
        "search": {"optimizer": "tpe", "trials": trials, "seed": 0,
                   "initial": ["uniform", {f"weight.{i}": 0.5 for i in range(len(EXPERT_TASKS))}],
                   "refine": max(1, trials // 4)},
        "execution": {"executor": "ray", "workers": 2},
    }
    header = ("# The demo search: per-model task-arithmetic weights for three tiny experts (reverse, swap, sort),\n"
              "# scored by exact match on each task and by the L1 distance from the base.\n"
              "# Build the models first: mergesearch demo-models <dir> (see mergesearch/demo/build.py).\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=1000)
