"""The merge kernel of this tree against another revision's, interleaved round by round.

Whole-model runs of ``merge_speed.py`` on this shared 2-core machine move ±20 % between runs, more than a kernel
change does. Here each kernel (this tree's :mod:`mergesearch.merging.kernels`, and the file given by
``--baseline``) lives in a process of its own that builds the same arrays from the same seed; the driver asks
them in turn, round after round, taking turns to go first, so both see the same machine state, and times a
triad of its own before each round. (One process cannot hold both: numba links the two modules' generated
functions, which share names, to one implementation.) Before timing, each kernel's output, written over a
NaN-filled destination, is checked against a float64 torch reference (within the dtype's tolerance) and the two
kernels' outputs for the same bits. An A/A run (the same kernels on both sides) measures its own spread.

Cases (fixed before the runs): task arithmetic (3 task vectors, weights 0.5/0.3/0.2, λ 1) and TIES (magnitude
bands at the 50 % quantile of each |τ|, sign consensus, normalised), in float32 and bfloat16, on 1 and 2
threads, 2^25 entries per array (128 MiB in float32), 10 rounds, torch seed 0; and TIES's float32 bracket pass
(its exact cut-off at density 0.5, one thread) against a plain read of the same τ (a torch sum).

    python benchmarks/kernel_side_by_side.py --baseline /tmp/old/mergesearch/merging/kernels.py
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from side_by_side import Pair

RESULT = Path(__file__).parent / "results" / "kernel_side_by_side.json"
CONFIG = {"entries": 1 << 25, "rounds": 10, "seed": 0, "weights": [0.5, 0.3, 0.2], "density": 0.5,
          "dtypes": ["float32", "bfloat16"], "threads": [1, 2], "cases": ["task_arithmetic", "ties"]}


def arrays(dtype_name: str) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """The base, the task vectors (0.01·N(0, 1)) and each |τ|'s cut at the configured density, from the seed."""
    torch.manual_seed(CONFIG["seed"])
    n, dtype = CONFIG["entries"], getattr(torch, dtype_name)
    base = torch.randn(n).to(dtype)
    taus = [(0.01 * torch.randn(n)).to(dtype) for _ in CONFIG["weights"]]
    # the quantile of a prefix (torch.quantile takes at most 2^24 entries)
    cuts = [float(t[: 1 << 24].float().abs().quantile(1 - CONFIG["density"])) for t in taus]
    return base, taus, cuts


def merge_args(case: str, cuts: list[float], baseline: bool) -> dict:
    """fused_merge's keyword arguments. Task arithmetic passes no band in this tree; the baseline revision's only
    rule without draws is the band, so it gets the open one."""
    w = CONFIG["weights"]
    if case == "task_arithmetic":
        band = {"lo": [-float("inf")] * len(w), "hi": [float("inf")] * len(w)} if baseline else {}
        return dict(coef=w, weights=w, lam=1.0, normalize=False, consensus=False, div_nc=1.0, **band)
    return dict(coef=w, weights=w, lam=1.0, normalize=True, consensus=True, div_nc=1.0, lo=cuts,
                hi=[float("inf")] * len(w))


def reference(case: str, base: torch.Tensor, taus: list[torch.Tensor], cuts: list[float]) -> torch.Tensor:
    """The merge in float64 torch ops (the kernels compute in float32: compared within a tolerance)."""
    w = CONFIG["weights"]
    u = [wi * t.double() * ((t.double().abs() >= c) if case == "ties" else 1.0)
         for wi, t, c in zip(w, taus, cuts, strict=True)]
    if case == "task_arithmetic":
        return base.double() + sum(u)
    s = sum(u)
    agree = [(ui != 0) & ((ui > 0) == (s >= 0)) for ui in u]
    num = sum(ui * a for ui, a in zip(u, agree, strict=True))
    den = sum(wi * a.double() for wi, a in zip(w, agree, strict=True))
    return base.double() + num / torch.where(den == 0, 1.0, den)


def bracket_bounds(tau: torch.Tensor) -> tuple[int, float, float, int]:
    """``bracket_select``'s (k, lo, hi, width) for the configured density's cut-off of |τ| (float32)."""
    from mergesearch.merging import sparsify as sp

    order = sp.MagnitudeOrder(tau)
    rank = tau.numel() - int(CONFIG["density"] * tau.numel())
    j = int(torch.searchsorted(order.ends, rank, right=True))
    key, below = int(order.keys[j]), int(order.ends[j - 1])
    return rank - below, sp._bits_f32(key << 16), sp._bits_f32(key << 16 | 0xFFFF), int(order.ends[j]) - below


def worker(path: str | None, bounds: tuple, conn) -> None:
    """One kernel's process: answers (dtype, case, threads) with the time of one merge, ("bracket",) with the time
    of one bracket pass (``bounds``: :func:`bracket_bounds`), None to stop. Checks its outputs against the
    reference before the first timing. It loads no other kernels module than its own."""
    if path is None:
        from mergesearch.merging import kernels
    else:  # numba's cache of a module loaded under another name does not load again: a fresh cache each run
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="ksbs-numba-")
        spec = importlib.util.spec_from_file_location("baseline_kernels", path)
        kernels = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels)

    data = {d: arrays(d) for d in CONFIG["dtypes"]}
    outs = {d: torch.empty_like(data[d][0]) for d in CONFIG["dtypes"]}
    bracket = (data["float32"][1][0], *bounds)
    digests = {}
    for d, (base, taus, cuts) in data.items():
        tol = 1e-6 if d == "float32" else 1e-2
        for case in CONFIG["cases"]:
            outs[d].fill_(float("nan"))
            kernels.fused_merge(base, outs[d], taus, **merge_args(case, cuts, path is not None), threads=1)
            close = torch.isclose(outs[d].double(), reference(case, base, taus, cuts), rtol=tol, atol=tol)
            if close.double().mean() < 1 - 1e-4:  # TIES's sign election flips where Σu is ~0 (float32 vs 64)
                conn.send(f"{case} {d}: {int((~close).sum())} entries differ from the float64 reference")
                return
            digests[f"{case} {d}"] = hashlib.sha1(outs[d].view(torch.uint8).numpy()).hexdigest()
    conn.send(("ready", kernels.bracket_select(*bracket), digests))
    while (msg := conn.recv()) is not None:
        if msg == ("bracket",):
            torch.set_num_threads(1)
            t = time.perf_counter()
            kernels.bracket_select(*bracket)
        else:
            d, case, threads = msg
            base, taus, cuts = data[d]
            torch.set_num_threads(threads)
            t = time.perf_counter()
            kernels.fused_merge(base, outs[d], taus, **merge_args(case, cuts, path is not None), threads=threads)
        conn.send(time.perf_counter() - t)


def summary(v: list[float]) -> dict:
    return {"best_s": min(v), "median_s": statistics.median(v)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="kernels.py of the revision to compare with")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    tau = arrays("float32")[1][0]
    bounds = bracket_bounds(tau)
    pair = Pair(worker, {"baseline": (str(args.baseline), bounds), "this tree": (None, bounds)})
    ready = pair.both(None)
    for name, msg in ready.items():
        if not (isinstance(msg, tuple) and msg[0] == "ready"):
            raise SystemExit(f"{name}: {msg}")
    if ready["baseline"][1:] != ready["this tree"][1:]:
        raise SystemExit("the two kernels disagree (bracket value or merged bits)")
    n = CONFIG["entries"]
    a, b, c = torch.zeros(n), torch.rand(n), torch.rand(n)

    def rounds(msg: tuple, threads: int) -> tuple[dict[str, list[float]], list[float]]:
        triads = []

        def triad() -> None:  # the machine's bandwidth right before each round
            t = time.perf_counter()
            torch.add(b, c, alpha=3.0, out=a)
            triads.append(time.perf_counter() - t)

        torch.set_num_threads(threads)
        return pair.rounds(msg, CONFIG["rounds"], before=triad), triads

    rows = []
    for d in CONFIG["dtypes"]:
        elem = getattr(torch, d).itemsize
        for case in CONFIG["cases"]:
            for threads in CONFIG["threads"]:
                times, triads = rounds((d, case, threads), threads)
                # bytes of an ideal one-pass merge: base and N task vectors read, the output written (+ RFO),
                # over the triad's bandwidth (4 float32 arrays' worth a pass, write-allocate)
                floor = n * elem * (len(CONFIG["weights"]) + 3) / (n * 16 / min(triads))
                row: dict = {"case": case, "dtype": d, "threads": threads, "floor_s": floor}
                for name, v in times.items():
                    row[name] = {**summary(v), "median_ratio": statistics.median(v) / floor}
                row["median_speedup"] = row["baseline"]["median_s"] / row["this tree"]["median_s"]
                rows.append(row)
                print(f"{case:16s} {d:9s} thr {threads}  median x floor: baseline {row['baseline']['median_ratio']:.2f}"
                      f"  this tree {row['this tree']['median_ratio']:.2f}   median speed-up "
                      f"{row['median_speedup']:.2f}", flush=True)
    times, _ = rounds(("bracket",), 1)
    reads = []
    for _ in range(CONFIG["rounds"]):
        t = time.perf_counter()
        tau.sum()
        reads.append(time.perf_counter() - t)
    row = {"case": "ties float32 cut-off (bracket pass)", "threads": 1,
           **{name: {**summary(v), "gbps_median": 4 * n / statistics.median(v) / 1e9} for name, v in
              [*times.items(), ("read (torch sum)", reads)]}}
    row["median_speedup"] = row["baseline"]["median_s"] / row["this tree"]["median_s"]
    rows.append(row)
    print(f"bracket pass     float32   thr 1  GB/s (median): baseline {row['baseline']['gbps_median']:.1f}  this "
          f"tree {row['this tree']['gbps_median']:.1f}  read {row['read (torch sum)']['gbps_median']:.1f}   median "
          f"speed-up {row['median_speedup']:.2f}", flush=True)
    pair.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": CONFIG, "baseline": str(args.baseline),
                                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                                    "load_average": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
