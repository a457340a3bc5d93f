"""The GPU half of issue 14's speed and memory figures, prepared as one run for a session that is lent a GPU.

No session has been lent one yet: this script has only run on the CPU (its smoke test). On a GPU it measures,
for ``merge_speed.py``'s model and plans (its ``CONFIG``: 134M parameters, 3 experts, weights (0.5, 0.3, 0.2),
density 0.5, fixed before any run):

1. **Warm in-place merges on the device** (``ResidentMerger(device=...)``), float32 and bfloat16, per method:
   best of ``--repeat`` applies (each synchronised) after one warm-up, against a physical floor from the same
   run: ``merge_speed.ideal_bytes`` (write-allocate) over the device's triad bandwidth (``a = b + 3·c`` on the
   device, ``--triad-mib`` MiB arrays, best of 5, counted with the same write-allocate convention). Every apply
   also checks its output finite (the engine raises otherwise).
2. **Offloaded task vectors** (``offload=True``): the device's peak allocated memory during a bfloat16 TIES
   apply against issue 14's bound, 2 × the model + one tensor (read strictly: its largest tensor once; and per
   tensor job: its N staged task vectors and a result), and the apply's time.

The device run, as one command (the device image lacks pydantic, optuna and ray: carry their wheels, see the
tool's README), with the CUDA conformance cases first::

    python -m pytest -q -m cuda tests/merging/test_conformance.py && \\
        python benchmarks/gpu_merge.py --out $OUT/gpu_merge.json

On the CPU, as the smoke test runs it: ``python benchmarks/gpu_merge.py --device cpu --methods linear``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from merge_speed import _ELEM, EXPERTS, MIB, build_models, ideal_bytes, machine_info, n_params, plan_dict, triad_bytes

RESULT = Path(__file__).parent / "results" / "gpu_merge.json"
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "della"]


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: str, repeat: int) -> float:
    """Best wall time of ``repeat`` calls, each ended by a device synchronisation."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def device_triad(device: str, mib: int, repeat: int = 5) -> dict:
    """Triad bandwidth on ``device`` (write-allocate bytes, as ``merge_speed.triad``)."""
    n = mib * MIB // 4
    b, c = torch.rand(n, device=device), torch.rand(n, device=device)
    a = torch.zeros(n, device=device)
    torch.add(b, c, alpha=3.0, out=a)  # warm-up: kernel selection and clocks
    best = timed(lambda: torch.add(b, c, alpha=3.0, out=a), device, repeat)
    return {"mib": mib, "best_s": best, "gbps": triad_bytes(n) / best / 1e9}


def in_place(m: dict[str, Path], device: str, dtypes: list[str], methods: list[str], repeat: int,
             gbps: float) -> list[dict]:
    """Warm apply time per (dtype, method) on ``device`` against the floor at ``gbps``."""
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan

    numel, rows = n_params(m), []
    for dtype in dtypes:
        merger = ResidentMerger(str(m["base"]), [str(m[e]) for e in EXPERTS], dtype=dtype, device=device)
        for method in methods:
            plan = MergePlan.model_validate(plan_dict(method, m, dtype))
            merger.apply(plan)  # fills the method's caches
            sync(device)
            warm = timed(lambda p=plan, mg=merger: mg.apply(p), device, repeat)
            floor = ideal_bytes(method, numel, len(EXPERTS), _ELEM[dtype]) / (gbps * 1e9)
            rows.append({"method": method, "dtype": dtype, "warm_s": warm, "floor_s": floor,
                         "ratio": round(warm / floor, 3)})
            print(json.dumps(rows[-1]), flush=True)
        del merger
    return rows


def offload(m: dict[str, Path], device: str, repeat: int) -> dict:
    """Peak device memory of a bfloat16 TIES apply with the task vectors in host memory, against 2 × the model +
    its largest tensor."""
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan
    from mergesearch.models import Checkpoint

    shapes = Checkpoint(str(m["base"])).shapes.values()
    model_bytes = sum(torch.Size(s).numel() for s in shapes) * _ELEM["bfloat16"]
    largest = max(torch.Size(s).numel() for s in shapes) * _ELEM["bfloat16"]
    merger = ResidentMerger(str(m["base"]), [str(m[e]) for e in EXPERTS], dtype="bfloat16", device=device,
                            offload=True)
    plan = MergePlan.model_validate(plan_dict("ties", m, "bfloat16"))
    merger.apply(plan)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    warm = timed(lambda: merger.apply(plan), device, repeat)
    peak = torch.cuda.max_memory_allocated(device)
    # the words read strictly (one tensor), and per tensor job (its N staged task vectors and a result)
    bound, job_bound = 2 * model_bytes + largest, 2 * model_bytes + (len(EXPERTS) + 1) * largest
    return {"warm_s": warm, "peak_bytes": peak, "model_bytes": model_bytes, "largest_tensor_bytes": largest,
            "bound_bytes": bound, "job_bound_bytes": job_bound, "peak_x_model": round(peak / model_bytes, 3),
            "met": peak <= bound, "met_per_job": peak <= job_bound}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--triad-mib", type=int, default=1024)
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/mergesearch-bench-models"))
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_merge: no CUDA device here (use --device cpu for the smoke run)")
    m = build_models(args.models_dir)
    triad = device_triad(args.device, args.triad_mib)
    print(f"triad on {args.device}: {triad['gbps']:.1f} GB/s (write-allocate)", flush=True)
    result = {"device": args.device, "machine": machine_info(), "triad": triad,
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
              "in_place": in_place(m, args.device, args.dtypes.split(","), args.methods.split(","), args.repeat,
                                   triad["gbps"])}
    if torch.device(args.device).type == "cuda":
        result["offload"] = offload(m, args.device, args.repeat)
        print(json.dumps(result["offload"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
