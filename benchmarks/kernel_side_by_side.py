"""The merge kernel of this tree against another revision's, in one process, interleaved.

Whole-model runs of ``merge_speed.py`` on this shared 2-core machine move ±20 % between runs, more than a kernel
change does. Here both kernels (this tree's :mod:`mergesearch.merging.kernels` and the file given by
``--baseline``, loaded under another module name) merge the same flat arrays in turn, round after round, so
both see the same machine state; each is timed by its best and median round, next to a triad of the same run.

Cases (fixed before the runs): task arithmetic (3 task vectors, weights 0.5/0.3/0.2, λ 1) and TIES (magnitude
bands at the 50 % quantile of each |τ|, sign consensus, normalised), in float32 and bfloat16, on 1 and 2
threads, 2^25 entries per array (128 MiB in float32), 9 rounds, torch seed 0.

    python benchmarks/kernel_side_by_side.py --baseline /tmp/old/mergesearch/merging/kernels.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

RESULT = Path(__file__).parent / "results" / "kernel_side_by_side.json"
CONFIG = {"entries": 1 << 25, "rounds": 9, "seed": 0, "weights": [0.5, 0.3, 0.2], "density": 0.5,
          "dtypes": ["float32", "bfloat16"], "threads": [1, 2], "cases": ["task_arithmetic", "ties"]}


def load_kernels(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(calls: dict, base: torch.Tensor, out: torch.Tensor, taus: list[torch.Tensor], threads: int) -> dict:
    """Both kernels' ``fused_merge`` (``calls``: name -> (module, keyword arguments)) in turn for the configured
    rounds, a triad before each round; their best and median times against the floor (bytes an ideal merge
    moves, write-allocate, over the round's best triad bandwidth)."""
    results = {}
    for name, (module, kwargs) in calls.items():  # compile, and check both give the same bits
        module.fused_merge(base, out, taus, **kwargs, threads=threads)
        results[name] = out.clone()
    first, second = results.values()
    if not torch.equal(first.view(torch.uint8), second.view(torch.uint8)):
        raise SystemExit(f"the two kernels disagree ({base.dtype}, {sorted(calls['this tree'][1])})")
    n = base.numel()
    times: dict[str, list[float]] = {k: [] for k in calls}
    triads = []
    torch.set_num_threads(threads)
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)
    for _ in range(CONFIG["rounds"]):
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        triads.append(time.perf_counter() - t)
        for name, (module, kwargs) in calls.items():
            t = time.perf_counter()
            module.fused_merge(base, out, taus, **kwargs, threads=threads)
            times[name].append(time.perf_counter() - t)
    bytes_moved = n * base.element_size() * (len(taus) + 1 + 2)  # base + N task vectors read, output (+RFO)
    floor = bytes_moved / (n * 4 * 4 / min(triads))  # triad: 4 float32 arrays' worth moved (write-allocate)
    out_row: dict = {"floor_s": floor}
    for name, v in times.items():
        out_row[name] = {"best_s": min(v), "median_s": statistics.median(v), "best_ratio": min(v) / floor,
                         "median_ratio": statistics.median(v) / floor}
    out_row["median_speedup"] = out_row["baseline"]["median_s"] / out_row["this tree"]["median_s"]
    return out_row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="kernels.py of the revision to compare with")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    from mergesearch.merging import kernels as new

    old = load_kernels(args.baseline, "baseline_kernels")
    n, w = CONFIG["entries"], CONFIG["weights"]
    torch.manual_seed(CONFIG["seed"])
    rows = []
    for dtype_name in CONFIG["dtypes"]:
        dtype = getattr(torch, dtype_name)
        base = torch.randn(n).to(dtype)
        taus = [(0.01 * torch.randn(n)).to(dtype) for _ in w]
        out = torch.empty_like(base)
        # the band's cut: the quantile of a prefix (torch.quantile takes at most 2^24 entries)
        cuts = [float(t[: 1 << 24].float().abs().quantile(1 - CONFIG["density"])) for t in taus]
        cases = {
            "task_arithmetic": (dict(coef=w, weights=w, lam=1.0, normalize=False, consensus=False, div_nc=1.0),
                                {}),
            "ties": (dict(coef=w, weights=w, lam=1.0, normalize=True, consensus=True, div_nc=1.0),
                     {"lo": cuts, "hi": [float("inf")] * len(w)}),
        }
        # the baseline's task arithmetic is the open band (its only rule without draws); ours passes no band
        for case in CONFIG["cases"]:
            rules, band = cases[case]
            old_band = band or {"lo": [-float("inf")] * len(w), "hi": [float("inf")] * len(w)}
            for threads in CONFIG["threads"]:
                calls = {"baseline": (old, {**rules, **old_band}), "this tree": (new, {**rules, **band})}
                row = {"case": case, "dtype": dtype_name, "threads": threads,
                       **measure(calls, base, out, taus, threads)}
                rows.append(row)
                print(f"{case:16s} {dtype_name:9s} thr {threads}  baseline best/median "
                      f"{row['baseline']['best_ratio']:.2f}/{row['baseline']['median_ratio']:.2f}x floor   "
                      f"this tree {row['this tree']['best_ratio']:.2f}/{row['this tree']['median_ratio']:.2f}x   "
                      f"median speed-up {row['median_speedup']:.2f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": CONFIG, "baseline": str(args.baseline),
                                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                    "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
