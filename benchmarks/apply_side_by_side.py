"""``ResidentMerger.apply`` of this tree against another engine tree's, whole model, interleaved round by round.

``merge_speed.py`` times one engine; on this shared 2-core machine two of its runs minutes apart differ by more
than most engine changes. Here each engine (this tree's ``mergesearch``, and the checkout given by
``--baseline``) lives in a process of its own that builds a ``ResidentMerger`` over ``merge_speed.py``'s model
(134M parameters, 3 experts, its CONFIG's weights and density 0.5); the driver asks them in turn, round after
round, taking turns to go first, for one warm ``apply`` of the same plan. Before timing a (method, dtype), both
engines apply it twice and report a digest of the resident model's weights: the two must hold the same bits.

Configuration (fixed before the runs, :data:`CONFIG`): task_arithmetic, ties, dare_ties, della and linear, in
float32 and bfloat16, 2 torch threads, 8 rounds (``--methods``, ``--dtypes``, ``--threads`` choose others, stored
with the figures). Reported per row: each engine's median and best time, and the median speed-up (baseline / this
tree). An A/A run (``--baseline`` naming this tree's own checkout) measures the comparison's own spread. A change
meant to change the bits (e.g. another summation dtype) runs with ``--bits-may-differ``: each row then records
whether they did instead of stopping.

    python benchmarks/apply_side_by_side.py --baseline /tmp/old   # a checkout whose mergesearch/ is imported
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from side_by_side import Pair

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "apply_side_by_side.json"
CONFIG = {"methods": ["task_arithmetic", "ties", "dare_ties", "della", "linear"], "dtypes": ["float32", "bfloat16"],
          "threads": 2, "rounds": 8, "warmup": 2}

def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-1 of the weights' bytes, in name order."""
    h = hashlib.sha1()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def revision(tree: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def worker(tree: str, models: dict[str, Path], threads: int, conn) -> None:
    """One engine's process: answers ("warm", method, dtype) with the weights' digest after ``warmup`` applies,
    ("time", method, dtype) with the time of one apply, None to stop. Imports no other engine than ``tree``'s."""
    sys.path.insert(0, tree)
    sys.path.insert(1, str(HERE))
    import merge_speed as ms

    import mergesearch
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan

    torch.set_num_threads(threads)
    conn.send(("ready", str(Path(mergesearch.__file__).resolve().parents[1])))
    merger, plans = None, {}
    while (msg := conn.recv()) is not None:
        kind, method, dtype = msg
        if merger is None or merger.dtype != getattr(torch, dtype):
            merger = None  # one merger at a time: each holds the model 5 times over
            merger = ResidentMerger(str(models["base"]), [str(models[e]) for e in ms.EXPERTS], dtype=dtype)
        plan = plans.setdefault((method, dtype), MergePlan.model_validate(ms.plan_dict(method, models, dtype)))
        if kind == "warm":
            for _ in range(CONFIG["warmup"]):
                merger.apply(plan)
            conn.send(digest(merger.model.state_dict()))
        else:
            t = time.perf_counter()
            merger.apply(plan)
            conn.send(time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="checkout of the engine to compare with")
    p.add_argument("--models-dir", type=Path, default=Path("/tmp/mergesearch-bench-models"))
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--methods", default=",".join(CONFIG["methods"]))
    p.add_argument("--dtypes", default=",".join(CONFIG["dtypes"]))
    p.add_argument("--threads", type=int, default=CONFIG["threads"])
    p.add_argument("--bits-may-differ", action="store_true", help="record, instead of stopping at, different bits")
    args = p.parse_args()
    config = {**CONFIG, "methods": args.methods.split(","), "dtypes": args.dtypes.split(","),
              "threads": args.threads}
    sys.path.insert(0, str(HERE))
    import merge_speed as ms

    models = ms.build_models(args.models_dir)
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE.parent}
    pair = Pair(worker, {name: (str(tree), models, config["threads"]) for name, tree in trees.items()})
    for name, (_, engine) in pair.both(None).items():
        if Path(engine) != trees[name]:
            raise SystemExit(f"{name}: imported the engine at {engine}, not {trees[name]}")
    rows = []
    for dtype in config["dtypes"]:
        for method in config["methods"]:
            same = len(set(pair.both(("warm", method, dtype)).values())) == 1
            if not same and not args.bits_may_differ:
                raise SystemExit(f"{method} {dtype}: the two engines' weights differ")
            times = pair.rounds(("time", method, dtype), config["rounds"])
            row = {"method": method, "dtype": dtype, "threads": config["threads"], "same_bits": same,
                   "load1": os.getloadavg()[0],
                   **{name: {"median_s": statistics.median(v), "best_s": min(v)} for name, v in times.items()}}
            row["median_speedup"] = row["baseline"]["median_s"] / row["this tree"]["median_s"]
            rows.append(row)
            print(f"{method:16s} {dtype:9s} median s: baseline {row['baseline']['median_s']:.3f}  this tree "
                  f"{row['this tree']['median_s']:.3f}   speed-up {row['median_speedup']:.2f}", flush=True)
    pair.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": config, "baseline": {"tree": str(trees["baseline"]), "commit": revision(trees["baseline"])},
        "this_tree": {"commit": revision(HERE.parent)}, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_average_at_end": os.getloadavg(), "rows": rows}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
