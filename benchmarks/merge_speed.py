"""Merge speed: in-place merges vs the memory-bandwidth floor, and ``mergesearch merge`` vs ``mergekit-yaml``.

A synthetic Llama (~134M parameters, fp32) and three noisy experts are saved as safetensors in a temp dir.
(a) ``ResidentMerger.apply`` per method (warm: task vectors, magnitude order and DARE draws cached; best of 3);
(b) the floor: one pass per tensor reading the same inputs and writing the output (``torch.add`` chains into
the model's parameters); (c) end to end, ``mergesearch merge`` and ``mergekit-yaml`` (``--mergekit-yaml`` or
MERGEKIT_YAML) on one TIES config, with an output equality check. Heavy: run it once, on a quiet machine.

    python benchmarks/merge_speed.py [--threads 1] [--mergekit-yaml /work/venv-mergekit/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

TARGETS = {"linear": 1.5, "task_arithmetic": 1.5, "ties": 3.0, "dare_ties": 3.0, "dare_linear": 3.0}


def build_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """Base + 3 experts (base + N(0, 0.01²)), ~134M parameters each."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    paths = {"base": root / "base"}
    model.save_pretrained(paths["base"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in "abc":
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + 0.01 * torch.randn_like(p))
        paths[name] = root / name
        model.save_pretrained(paths[name])
    return paths


def plan_for(method: str, m: dict[str, Path], density: float = 0.5) -> dict:
    base = {"merge_method": method, "dtype": "float32", "random_seed": 0}
    experts = [str(m[k]) for k in "abc"]
    if method == "linear":
        return {**base, "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, (0.5, 0.3, 0.2),
                                                                                           strict=True)]}
    return {**base, "base_model": str(m["base"]),
            "models": [{"model": e, "parameters": {"weight": w, "density": density}}
                       for e, w in zip(experts, (0.5, 0.3, 0.2), strict=True)]}


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def in_place(m: dict[str, Path], methods: list[str]) -> list[dict]:
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan

    t = time.perf_counter()
    merger = ResidentMerger(str(m["base"]), [str(m[k]) for k in "abc"])
    load_s = time.perf_counter() - t
    params = {n: merger._target(n) for n in merger.tensor_names}
    experts = [str(m[k]) for k in "abc"]

    def floor(raw: bool) -> None:  # read base (or first expert) + 3 inputs, write the output: the fused minimum
        with torch.no_grad():
            for n, out in params.items():
                xs = [merger.tensor(e, n) for e in experts] if raw else [merger.base_state[n]] + [
                    merger.delta(e, n) for e in experts]
                torch.add(xs[0], xs[1], out=out)
                for x in xs[2:]:
                    out.add_(x)

    rows = []
    for method in methods:
        plan = MergePlan.model_validate(plan_for(method, m))
        t = time.perf_counter()
        merger.apply(plan)  # first call fills caches (sorted |τ|, DARE draws, raw tensors for linear)
        cold = time.perf_counter() - t
        repeat = 1 if method.startswith("della") else 3  # della's Bernoulli draws alone take seconds
        fl = best_of(lambda r=method == "linear": floor(r), repeat)
        warm = best_of(lambda p=plan: merger.apply(p), repeat)
        # what a search sees: every trial a new density (magnitude orders, DARE draws and L1 tables are reused)
        moved = iter(MergePlan.model_validate(plan_for(method, m, 0.3 + 0.1 * i)) for i in range(repeat))
        warm_new = best_of(lambda it=moved: merger.apply(next(it)), repeat)
        fl2 = best_of(lambda r=method == "linear": floor(r), repeat)
        fl = min(fl, fl2)  # floor measured before and after, side by side with the merges (shared machine)
        row = {"method": method, "cold_s": round(cold, 3), "warm_s": round(warm, 3),
               "warm_new_density_s": round(warm_new, 3), "floor_s": round(fl, 3), "ratio": round(warm / fl, 2),
               "ratio_new_density": round(warm_new / fl, 2), "target": TARGETS.get(method)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    rows.append({"resident_merger_load_s": round(load_s, 2)})
    return rows


def end_to_end(m: dict[str, Path], root: Path, mergekit_yaml: str | None, threads: int) -> dict:
    cfg = root / "ties.yml"
    plan = plan_for("ties", m)
    plan.pop("random_seed")
    cfg.write_text(yaml.safe_dump(plan))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mergesearch.cli", "merge", str(cfg), str(root / "ours")], check=True,
                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = time.perf_counter() - t
    res: dict = {"mergesearch_merge_s": round(ours, 2)}
    print(json.dumps(res), flush=True)
    if not mergekit_yaml or not Path(mergekit_yaml).is_file():
        res["mergekit"] = "skipped: mergekit-yaml not found"
        return res
    t = time.perf_counter()
    subprocess.run([mergekit_yaml, str(cfg), str(root / "theirs")], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    theirs = time.perf_counter() - t
    from safetensors.torch import load_file

    def load(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = load(root / "ours"), load(root / "theirs")
    diff = max((a[k] - b[k]).abs().max().item() for k in a) if set(a) == set(b) else float("nan")
    res.update(mergekit_yaml_s=round(theirs, 2), speedup=round(theirs / ours, 2), max_abs_diff=diff,
               **tie_check(a, b, m, plan))
    print(json.dumps(res), flush=True)
    return res


def tie_check(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], m: dict[str, Path],
              plan: dict) -> dict:
    """Where the two TIES outputs differ, is some expert's |τ| exactly at its density cut-off?

    mergekit keeps the top k = int(density·n) entries by ``argsort``, an unstable sort, so among entries tied in
    magnitude with the k-th it keeps an arbitrary subset; we keep them all. Differences anywhere else would be bugs.
    """
    from safetensors.torch import load_file

    def state(name: str) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(m[name].glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    base, experts = state("base"), [state(k) for k in "abc"]
    density = plan["models"][0]["parameters"]["density"]
    differing = outside = 0
    max_outside = 0.0
    for name, x in ours.items():
        bad = (x - theirs[name]).abs() > 1e-6
        if not bad.any():
            continue
        at_cut = torch.zeros_like(bad)
        for e in experts:
            mag = (e[name] - base[name]).abs().reshape(-1)
            kth = mag.topk(max(1, int(density * mag.numel()))).values[-1]
            at_cut |= (mag == kth).reshape(bad.shape)
        differing += int(bad.sum())
        off = bad & ~at_cut
        outside += int(off.sum())
        if off.any():
            max_outside = max(max_outside, (x - theirs[name]).abs()[off].max().item())
    return {"entries_differing": differing, "entries_differing_not_at_a_cutoff_tie": outside,
            "max_abs_diff_not_at_a_cutoff_tie": max_outside}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mergekit-yaml", default=os.environ.get("MERGEKIT_YAML",
                                                              "/work/venv-mergekit/bin/mergekit-yaml"))
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties,dare_linear,breadcrumbs,della")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "merge_speed.json")
    ap.add_argument("--before", type=Path, default=None, help="an earlier result JSON to embed as 'before'")
    args = ap.parse_args()
    print(f"load average: {os.getloadavg()}", flush=True)
    torch.set_num_threads(args.threads)
    before = json.loads(args.before.read_text()) if args.before and args.before.is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        models = build_models(root)
        print(f"built models in {time.perf_counter() - t:.1f}s", flush=True)
        n_params = sum(torch.Size(s).numel() for s in _shapes(models["base"]))
        rows = in_place(models, args.methods.split(","))
        e2e = end_to_end(models, root, args.mergekit_yaml, args.threads)
    result = {"params": n_params, "threads": args.threads, "torch": torch.__version__,
              "load_average_at_end": os.getloadavg(), "in_place": rows, "end_to_end": e2e}
    if before is not None:  # keep the figures of an earlier run next to the new ones (one level deep)
        before.pop("before", None)
        result["before"] = before
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"saved {args.out}")


def _shapes(path: Path) -> list[tuple[int, ...]]:
    from mergesearch.models import Checkpoint

    return list(Checkpoint(str(path)).shapes.values())


if __name__ == "__main__":
    main()
