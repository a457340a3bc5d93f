"""The non-local demo (issue 17): experts that share no local basin with the base, so naive merges collapse.

Regime: **permuted experts**. The ordinary demo (:func:`mergesearch.demo.build.build_demo`, same seed and recipe)
is built first; then each of its experts gets its own random permutation of the MLP units and attention head
groups of every decoder layer (:func:`mergesearch.merging.align.apply_permutation`, seeded per task). A
permutation is function-preserving — each permuted expert answers exactly as the original does, so each keeps its
own-task accuracy (≥ 0.9) — but moves the expert far away from the base in weight space: its task vector
``θ_expert − θ_base`` is no longer a small step inside the base's basin but mostly the difference between two
differently ordered copies of the same network. Averaging such task vectors mixes unrelated units, and the uniform
average and TIES collapse. Permutation alignment (``space.align: [weights]`` or ``[activations]``) should find the
inverse permutations and restore the ordinary demo's merges.

Why this regime (and not experts from bases pretrained with other seeds, or long high-learning-rate fine-tuning):

- It is non-local for exactly the reason alignment exists (permutation symmetry), with a known ground truth (the
  permutations are saved), so "how much does alignment recover" is measurable, not guessed.
- :mod:`mergesearch.merging.align` permutes MLP units and head groups but never residual-stream dimensions, so two
  bases pretrained from different seeds (different residual bases) cannot be aligned by it at all; and such
  experts raise the question of which base the merge uses (none of theirs is shared).
- Long fine-tuning at a high learning rate without replay makes merges fail (DEMO_NOTES), but that failure is not
  what alignment addresses, and it costs minutes of training on two busy cores; this regime costs none beyond the
  ordinary demo.

Layout (next to the ordinary demo's files, which stay as they are in the same directory)::

    DIR/base, DIR/experts/{task}, DIR/data/..., DIR/demo.yaml, DIR/build.json   the ordinary demo
    DIR/non_local/experts/{task}        permuted experts (safetensors, config, tokenizer)
    DIR/non_local/permutations.safetensors   the permutation applied to each (align.save_permutations format)
    DIR/non_local.yaml                  the job: base DIR/base, models the permuted experts, align [none, weights]
    DIR/non_local/build.json            marker: settings and the test-split accuracies measured at build time

``mergesearch demo-models DIR --non-local`` calls ``build_non_local(DIR, seed=SEED, fast=FAST, progress=print)``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mergesearch.demo.build import FAST, FULL, THREADS, build_demo, demo_config_yaml
from mergesearch.demo.check import exact_match, quiet_transformers
from mergesearch.demo.tasks import EXPERT_TASKS, read_jsonl

#: Bump when the permuted experts, the layout or the measured rows change.
VERSION = 1
SUBDIR = "non_local"
CONFIG = "non_local.yaml"
MARKER = "build.json"
PERMUTATIONS = "permutations.safetensors"

#: The merges measured at build time and by :func:`merge_table`: label -> (method, per-model weight, density,
#: lambda). TIES d = 0.5, w = 1, λ = 1 is the benchmarks' "ties default"; d = 0.2 is DEMO_NOTES' row.
MERGES: dict[str, tuple[str, float | None, float | None, float]] = {
    "uniform average": ("task_arithmetic", 1 / 3, None, 1.0),
    "task arithmetic λ=0.5": ("task_arithmetic", 0.5, None, 1.0),
    "ties d=0.5": ("ties", 1.0, 0.5, 1.0),
    "ties d=0.2": ("ties", 1.0, 0.2, 1.0),
}


def non_local_paths(out_dir: Path) -> dict[str, Any]:
    """The layout of a non-local build in ``out_dir`` (whether or not it exists yet)."""
    root = Path(out_dir)
    sub = root / SUBDIR
    return {"root": root, "base": root / "base", "local_experts": {t: root / "experts" / t for t in EXPERT_TASKS},
            "experts": {t: sub / "experts" / t for t in EXPERT_TASKS},
            "data": {t: root / "data" / f"{t}.jsonl" for t in EXPERT_TASKS},
            "test": {t: root / "data" / f"{t}_test.jsonl" for t in EXPERT_TASKS},
            "permutations": sub / PERMUTATIONS, "config": root / CONFIG, "local_config": root / "demo.yaml",
            "marker": sub / MARKER}


def permutation_seed(seed: int, task: str) -> int:
    """The torch generator seed of ``task``'s permutation (stable across runs and platforms)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:permute:{task}".encode()).digest()[:7], "little")


def build_non_local(out_dir: Path, *, seed: int = 0, fast: bool = False,
                    progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or reuse) the non-local demo: the ordinary demo plus a randomly permuted copy of each expert.

    Args:
        out_dir: the build directory (created if missing); the ordinary demo is built (or reused) in it too.
        seed: the ordinary demo's seed (models and data) and the permutations' seed.
        fast: the ordinary demo's small variant (4 digits, 2 layers; tests).
        progress: called with one-line status messages.

    Returns:
        :func:`non_local_paths` plus ``accuracy``: test-split exact match, row -> task -> accuracy, for
        ``base``, ``expert {task}`` (the permuted experts), and the naive :data:`MERGES` of the permuted experts
        (no alignment), with ``local {label}`` rows for the same merges of the unpermuted experts; and
        ``max_logit_change``: per task, the largest |logit| difference between an expert and its permuted copy
        on its test prompts (function preserved: float rounding only).

    Raises:
        MergeSearchError: if ``out_dir`` is an existing file (from :func:`build_demo`).
    """
    say = progress or (lambda _msg: None)
    build_demo(Path(out_dir), seed=seed, fast=fast, progress=progress)
    paths = non_local_paths(out_dir)
    settings = {"version": VERSION, "seed": seed, "recipe": asdict(FAST if fast else FULL)}
    try:
        saved = json.loads(paths["marker"].read_text())
    except (OSError, ValueError):
        saved = None
    if saved is not None and {k: saved.get(k) for k in settings} == settings:
        say(f"non-local demo already built in {paths['root']}")
        return {**paths, "accuracy": saved["accuracy"], "max_logit_change": saved["max_logit_change"]}

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with quiet_transformers():
            measured = _build(paths, seed, say)
    finally:
        torch.set_num_threads(threads)
    paths["marker"].write_text(json.dumps({**settings, **measured}, indent=1) + "\n")
    return {**paths, **measured}


def _build(paths: dict[str, Any], seed: int, say: Callable[[str], None]) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from mergesearch.merging import align

    start = time.perf_counter()
    paths["marker"].unlink(missing_ok=True)
    config = AutoConfig.from_pretrained(paths["base"])
    perms = {}
    for task in EXPERT_TASKS:
        src, dst = paths["local_experts"][task], paths["experts"][task]
        perm = align.ModelPermutation.random(config, torch.Generator().manual_seed(permutation_seed(seed, task)))
        state = load_file(str(src / "model.safetensors"))
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
        permuted = align.apply_permutation(state, config, perm)
        save_file({k: v.contiguous() for k, v in permuted.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        perms[str(dst.relative_to(paths["root"]))] = perm
    align.save_permutations(paths["permutations"], perms, {"seed": str(seed), "source": "experts/{task}"})
    write_non_local_config(paths["root"])
    measured = _measure(paths)
    say(f"non-local demo built in {time.perf_counter() - start:.0f} s: {paths['root'] / SUBDIR}")
    return measured


def _measure(paths: dict[str, Any]) -> dict[str, Any]:
    """Test-split exact match of the base, the permuted experts and the naive merges (:func:`merge_table`), and
    how much permuting changed each expert's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["base"])
    tests = {t: read_jsonl(paths["test"][t]) for t in EXPERT_TASKS}
    model = AutoModelForCausalLM.from_pretrained(paths["base"]).eval()
    acc: dict[str, dict[str, float]] = {"base": _scores(model, tok, tests)}
    change = {}
    for task in EXPERT_TASKS:
        local = AutoModelForCausalLM.from_pretrained(paths["local_experts"][task]).eval()
        permuted = AutoModelForCausalLM.from_pretrained(paths["experts"][task]).eval()
        acc[f"expert {task}"] = _scores(permuted, tok, tests)
        ids = tok([r["prompt"] for r in tests[task][:64]], return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            change[task] = float((local(input_ids=ids).logits - permuted(input_ids=ids).logits).abs().max())
    acc.update(merge_table(paths["root"], modes=("none",), include_local=True))
    return {"accuracy": acc, "max_logit_change": change}


def _scores(model: Any, tok: Any, tests: Mapping[str, Sequence[dict[str, str]]]) -> dict[str, float]:
    return {t: round(exact_match(model, tok, tests[t]), 4) for t in EXPERT_TASKS}


def merge_table(root: str | Path, *, modes: Sequence[str] = ("none", "weights", "activations"),
                include_local: bool = False, split: str = "test") -> dict[str, dict[str, float]]:
    """Exact match of :data:`MERGES` of the permuted experts under each alignment mode, through the merge engine.

    Rows are ``{label}`` (``none``: naive), ``{label} [aligned: weights]`` and ``{label} [aligned: activations]``
    for the aligned experts (:func:`mergesearch.merging.aligned.ensure_aligned`: written under
    ``$MERGESEARCH_CACHE`` once), and ``local {label}`` for the same merge of the unpermuted experts when
    ``include_local``. Activation matching runs on the search split's prompts.

    Args:
        root: a directory written by :func:`build_non_local`.
        modes: subset of ``none``, ``weights``, ``activations``.
        include_local: add the unpermuted experts' rows.
        split: ``test`` (512 per task) or ``search`` (128).
    """
    from mergesearch.config import load_config
    from mergesearch.merging.aligned import align_prompts, ensure_aligned
    from mergesearch.merging.plan import InputModel, MergePlan

    paths = non_local_paths(Path(root))
    config = load_config(paths["config"])
    sets: dict[str, list[str]] = {}
    for mode in modes:
        if mode == "none":
            sets["none"] = list(config.models)
        else:
            prompts = align_prompts(None, [o.data for o in config.objectives if o.data is not None]) \
                if mode == "activations" else []
            sets[mode] = [str(ensure_aligned(config.base_model, m, mode, prompts)) for m in config.models]
    if include_local:
        sets["local"] = [str(paths["local_experts"][t].resolve()) for t in EXPERT_TASKS]

    def plan(models: list[str], method: str, w: float | None, d: float | None, lam: float) -> MergePlan:
        params = {k: v for k, v in (("weight", w), ("density", d)) if v is not None}
        return MergePlan(merge_method=method, base_model=config.base_model,
                         models=[InputModel(model=m, parameters=dict(params)) for m in models],
                         parameters={"lambda": lam}, dtype=config.dtype)

    labelled = {}
    for mode, models in sets.items():
        for label, spec in MERGES.items():
            name = label if mode == "none" else f"local {label}" if mode == "local" else f"{label} [aligned: {mode}]"
            labelled[name] = plan(models, *spec)
    return score_plans(config, labelled, split=split, extra_models=[m for ms in sets.values() for m in ms])


def score_plans(config: Any, plans: Mapping[str, Any], *, split: str = "test",
                extra_models: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Task accuracies (``config``'s task objectives on ``split``) of each plan, merged by a resident merger.

    Args:
        config: a job (its base, models and objectives).
        plans: label -> :class:`~mergesearch.merging.plan.MergePlan` (or its dict).
        split: ``search`` or ``test``.
        extra_models: other experts the plans name (aligned copies), loaded next to the job's models.
    """
    from transformers import AutoTokenizer

    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate

    models = list(dict.fromkeys([*config.models, *extra_models]))
    merger = ResidentMerger(config.base_model, models, dtype=config.dtype)
    tok = AutoTokenizer.from_pretrained(config.base_model)
    tasks = [o for o in config.objectives if o.data is not None]
    objectives = build_objectives(tasks, ObjectiveContext(base_state=merger.base_state, split=split))
    out = {}
    for label, p in plans.items():
        values = evaluate(objectives, merger.apply(MergePlan.model_validate(p) if isinstance(p, Mapping) else p),
                          tok)
        out[label] = {o.name: round(float(values[o.name]), 4) for o in tasks}
    return out


def write_non_local_config(out_dir: Path, *, trials: int = 40) -> Path:
    """Write ``out_dir/non_local.yaml``: the demo job on the permuted experts, with ``align: [none, weights]``
    searched (so the search itself finds that aligning pays)."""
    import yaml

    root = Path(out_dir)
    text = demo_config_yaml(root, root, trials=trials)
    config = yaml.safe_load(text)
    config["models"] = [f"./{SUBDIR}/experts/{t}" for t in EXPERT_TASKS]
    config["space"]["align"] = ["none", "weights"]
    header = ("# The non-local demo: the demo's search on experts whose hidden units were randomly permuted\n"
              "# (function-preserving, far from the base in weight space; naive merges collapse). Alignment is a\n"
              "# searched choice. Build: mergesearch demo-models <dir> --non-local (mergesearch/demo/non_local.py).\n")
    target = root / CONFIG
    target.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=1000))
    return target


def identity_fraction(perm: Any) -> dict[str, float]:
    """Fraction of MLP units and head groups a :class:`~mergesearch.merging.align.ModelPermutation` leaves in
    place."""
    mlp = torch.cat([lp.mlp for lp in perm.layers])
    attn = torch.cat([lp.attn for lp in perm.layers])
    return {"mlp": float((mlp == torch.arange(len(perm.layers[0].mlp)).repeat(len(perm.layers))).float().mean()),
            "attn": float((attn == torch.arange(len(perm.layers[0].attn)).repeat(len(perm.layers))).float().mean())}


def recovery(root: str | Path) -> dict[str, Any]:
    """Weight matching on the build, per task: fraction of identity units when a LOCAL expert is matched to the
    base (alignment should change nothing), and fraction of units where matching the PERMUTED expert recovers the
    inverse of the permutation applied (alignment should undo it)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mergesearch.merging import align

    paths = non_local_paths(Path(root))
    config = AutoConfig.from_pretrained(paths["base"])
    base = load_file(str(paths["base"] / "model.safetensors"))
    applied, _ = align.load_permutations(paths["permutations"], config)
    out: dict[str, Any] = {}
    for task in EXPERT_TASKS:
        local = align.weight_matching(base, load_file(str(paths["local_experts"][task] / "model.safetensors")),
                                      config)
        found = align.weight_matching(base, load_file(str(paths["experts"][task] / "model.safetensors")), config)
        truth = applied[f"{SUBDIR}/experts/{task}"].inverse()
        # found ∘ truth⁻¹ is the identity where matching recovered the ground truth
        composed = [align.LayerPermutation(mlp=f.mlp[_inv(t.mlp)], attn=f.attn[_inv(t.attn)])
                    for f, t in zip(found.layers, truth.layers, strict=True)]
        out[task] = {"local_identity": identity_fraction(local),
                     "permuted_recovered": identity_fraction(align.ModelPermutation(found.widths, tuple(composed))),
                     "permuted_exact": found == truth}
    return out


def _inv(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(len(p), dtype=p.dtype)
    return inv


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mergesearch.demo.non_local DIR [--fast] [--seed N] [--align]``: build and print the table."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--align", action="store_true", help="also measure the merges after weight/activation alignment")
    args = p.parse_args(argv)
    built = build_non_local(args.out_dir, seed=args.seed, fast=args.fast, progress=print)
    rows = dict(built["accuracy"])
    if args.align:
        rows.update(merge_table(args.out_dir, modes=("weights", "activations")))
    print(f"| model | {' | '.join(EXPERT_TASKS)} |\n|---|{'---|' * len(EXPERT_TASKS)}")
    for label, accs in rows.items():
        print(f"| {label} | {' | '.join(f'{accs[t]:.3f}' for t in EXPERT_TASKS)} |")
    print("max |logit| change from permuting:", built["max_logit_change"])


if __name__ == "__main__":
    main()
