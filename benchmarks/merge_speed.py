"""Merge speed against a physical floor, memory of the resident merger, and ``mergesearch merge`` vs mergekit.

Three parts, each a separate run that updates one JSON file (``benchmarks/results/merge_speed.json``):

``--in-place`` (default part)
    ``ResidentMerger.apply`` per method, dtype (float32, bfloat16) and thread count (1, 2): warm in-place merge
    time (best of ``REPEAT`` after one warm-up merge at the same thread count), against a *physical* floor:
    the bytes an ideal one-pass merge moves divided by the machine's memory bandwidth, measured in the same run
    with a STREAM triad ``a = b + s·c`` (``torch.add(b, c, alpha=s, out=a)``, arrays of ``TRIAD_MIB`` MiB each,
    8× the 32 MiB L3 here; best of ``TRIAD_REPEAT``; 1 and 2 threads). The triad is re-measured around every
    method and the best bandwidth of the whole run is the one used (the strictest floor).

    Byte accounting (:func:`ideal_bytes`): an ideal one-pass merge reads the base (not for ``linear``, which
    reads its N inputs only) and N task vectors in the job dtype, plus DARE's N int16 draws, plus DELLA's N
    int16 draws and N float32 row ranks, and writes the output once in the job dtype. **Write-allocate is
    assumed** (ordinary x86 stores read the line before writing it), consistently on both sides: the triad
    moves 4 arrays' worth per pass (read b, c; read-for-ownership + write a), the merge 2 bytes per output
    byte. Under the STREAM convention (3 arrays, no RFO; also stored) the floor would be ~10 % larger, so the
    write-allocate floor is the stricter of the two.

``--e2e``
    End to end on one TIES config (3 experts, density 0.5), float32 and bfloat16: ``mergesearch merge`` (the
    CLI, in a subprocess, so both sides pay their imports) and ``mergesearch.merging.run.merge_config``
    in-process, vs ``mergekit-yaml`` 0.1.5 (``--mergekit-yaml PATH``; skipped with a note when absent). The
    outputs are compared entry by entry and every differing entry classified (:func:`classify_ties_diff`).

``--memory``
    Peak RSS of a search-like workload (``ResidentMerger`` over the model, then TIES plans at densities
    ``MEMORY_DENSITIES``), measured from outside with ``/usr/bin/time -v`` in a subprocess, float32 and
    bfloat16, minus the peak RSS of the same interpreter that only imports torch + transformers (and, as a second
    figure, minus one that also loads the engine's compiled kernels). Reported as a multiple of the model's bytes
    in the job dtype, against (N + 2) × model bytes + 15 %.

The configuration is fixed here, before any run (``CONFIG``): a synthetic Llama of 134,105,856 parameters
(vocab 32000, hidden 768, MLP 2048, 12 layers, 12 heads, untied embeddings; torch seed 0) saved in float32,
three experts = base + N(0, 0.01²) (seeds 1, 2, 3), weights (0.5, 0.3, 0.2), density 0.5 for every sparsifier
(DELLA epsilon 0.15, breadcrumbs gamma 0.01, the defaults), lambda 1, plan random_seed 0. The machine is shared:
every figure is stored with the 1-minute load average measured next to it.

    python benchmarks/merge_speed.py --dtypes float32            # in-place, ~4 min
    python benchmarks/merge_speed.py --dtypes bfloat16           # in-place, ~4 min
    python benchmarks/merge_speed.py --e2e --mergekit-yaml /tmp/mkvenv/bin/mergekit-yaml
    python benchmarks/merge_speed.py --memory
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "merge_speed.json"
MIB = 1 << 20

#: everything a result depends on, decided before running (see the module docstring)
CONFIG = {
    "model": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 12, "tie_word_embeddings": False},
    "model_seed": 0, "expert_seeds": [1, 2, 3], "expert_noise_std": 0.01, "saved_dtype": "float32",
    "weights": [0.5, 0.3, 0.2], "density": 0.5, "random_seed": 0,
    "methods": ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear"],
    "dtypes": ["float32", "bfloat16"], "threads": [1, 2], "warmup": 1, "repeat": 3,
    "new_density_repeat": 3, "new_densities": [0.3, 0.4, 0.6],
    "triad_mib": 256, "triad_repeat": 5, "write_allocate": True,
    "memory_densities": [0.3, 0.5, 0.7, 0.9], "e2e_threads": 2,
}
EXPERTS = ("a", "b", "c")

#: ratio of warm time to the floor that each method must stay under (issue 14 item 5)
TARGETS = {"linear": 1.5, "task_arithmetic": 1.5, "ties": 2.5, "dare_ties": 2.5, "dare_linear": 2.5,
           "della": 3.0, "della_linear": 3.0}
#: bfloat16 time per byte <= this × float32 time per byte (same method, same threads)
BF16_PER_BYTE_TARGET = 1.3
#: end-to-end speed-up over mergekit-yaml
E2E_TARGET = 5.0
#: peak RSS target: (N + 2) × model bytes × (1 + this)
MEMORY_SLACK = 0.15

_ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------- pure helpers


def ideal_bytes(method: str, numel: int, n_experts: int, elem: int, *, write_allocate: bool = True) -> int:
    """Bytes an ideal one-pass merge of ``numel`` entries moves between memory and the cores.

    Reads: the base (except ``linear``, whose inputs are the N models themselves) and N task vectors of
    ``elem`` bytes an entry; DARE also reads N int16 draws, DELLA N int16 draws and N float32 row ranks. Writes:
    the output once (``elem`` bytes an entry), counted twice under write-allocate (read-for-ownership + write).
    """
    reads = (n_experts if method == "linear" else n_experts + 1) * elem
    if method.startswith("dare"):
        reads += n_experts * 2
    elif method.startswith("della"):
        reads += n_experts * (2 + 4)
    writes = elem * (2 if write_allocate else 1)
    return numel * (reads + writes)


def triad_bytes(n: int, elem: int = 4, *, write_allocate: bool = True) -> int:
    """Bytes one triad pass ``a = b + s·c`` over ``n`` entries moves (3 arrays, 4 with write-allocate)."""
    return n * elem * (4 if write_allocate else 3)


def triad(mib: int = 256, threads: int = 1, repeat: int = 5) -> dict:
    """STREAM-style triad bandwidth: ``a = b + 3·c`` over float32 arrays of ``mib`` MiB each, best of ``repeat``.

    Returns:
        {"threads", "mib", "best_s", "gbps" (write-allocate bytes / best time), "gbps_stream" (3 arrays)}.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = mib * MIB // 4
        b, c = torch.rand(n), torch.rand(n)
        a = torch.zeros(n)  # touched: no page faults inside the timed pass
        best, cpu = best_of_cpu(lambda: torch.add(b, c, alpha=3.0, out=a), repeat)
        return {"threads": threads, "mib": mib, "best_s": best, "cpu_s": cpu, "gbps": triad_bytes(n) / best / 1e9,
                "gbps_stream": triad_bytes(n, write_allocate=False) / best / 1e9}
    finally:
        torch.set_num_threads(old)


def floor_s(method: str, numel: int, n_experts: int, dtype: str, gbps: float) -> float:
    """The physical floor: ideal bytes (write-allocate) / bandwidth (write-allocate, same convention)."""
    return ideal_bytes(method, numel, n_experts, _ELEM[dtype]) / (gbps * 1e9)


def best_of(fn, repeat: int) -> float:
    """Minimum wall time of ``repeat`` calls."""
    return best_of_cpu(fn, repeat)[0]


def best_of_cpu(fn, repeat: int) -> tuple[float, float]:
    """(wall, process CPU time) of the fastest of ``repeat`` calls.

    On a shared machine the CPU time tells descheduling apart from slow code: with one thread, wall ≫ CPU
    means the process waited for a core (memory stalls still count as CPU time).
    """
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        run = (time.perf_counter() - t, time.process_time() - c)
        best = min(best, run)
    return best


def parse_time_v(text: str) -> dict:
    """``/usr/bin/time -v`` output -> {"max_rss_kib", "wall_s", "exit_status"} (missing fields absent)."""
    out: dict = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["max_rss_kib"] = int(m.group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text)
    if m:
        out["wall_s"] = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        out["exit_status"] = int(m.group(1))
    return out


def memory_target_bytes(model_bytes: int, n_experts: int, slack: float = MEMORY_SLACK) -> float:
    """(N + 2) × model bytes × (1 + slack)."""
    return (n_experts + 2) * model_bytes * (1 + slack)


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of ``x`` in its own dtype (float64 result; the subnormal spacing at 0)."""
    fi = torch.finfo(x.dtype)
    a = x.abs().double()
    e = torch.floor(torch.log2(torch.clamp(a, min=fi.tiny)))
    return torch.exp2(e - (fi.bits - _exp_bits(x.dtype) - 1))


def _exp_bits(dtype: torch.dtype) -> int:
    return {torch.float32: 8, torch.bfloat16: 8, torch.float16: 5, torch.float64: 11}[dtype]


def classify_ties_diff(ours: torch.Tensor, theirs: torch.Tensor, at_cut: torch.Tensor) -> dict:
    """Classify the entries where two TIES outputs differ (same shape and dtype).

    Classes: ``at_cutoff_tie`` (some expert's |τ| equals its k-th largest magnitude: mergekit keeps an arbitrary
    subset of such ties, we keep them all); else ``one_ulp`` (differ by at most one ulp of the output dtype:
    rounding — mergekit rounds every step in the job dtype, we round once); else ``other`` (unexplained).
    """
    differ = (ours != theirs) & ~(ours.isnan() & theirs.isnan())
    d = (ours.double() - theirs.double()).abs()
    one = differ & ~at_cut & (d <= ulp(theirs) * (1 + 1e-9))
    other = differ & ~at_cut & ~one
    return {"differing": int(differ.sum()), "at_cutoff_tie": int((differ & at_cut).sum()),
            "one_ulp": int(one.sum()), "other": int(other.sum()),
            "max_abs_other": float(d[other].max()) if other.any() else 0.0}


def machine_info() -> dict:
    """CPU model, cores, load average, versions, date."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:  # pragma: no cover
        numba_version = None
    import numpy as np

    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__, "numba": numba_version, "numpy": np.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "engine": engine_revision()}


def engine_revision() -> dict:
    """The commit the engine was measured at and the engine files changed on top of it (the tree is shared)."""
    root = Path(__file__).resolve().parents[1]

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "modified": git("status", "--short", "--", "mergesearch/merging").splitlines()}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------------------------ models


def build_models(root: Path) -> dict[str, Path]:
    """Base + experts as float32 safetensors under ``root`` (reused when ``root/stamp.json`` matches CONFIG)."""
    stamp = {k: CONFIG[k] for k in ("model", "model_seed", "expert_seeds", "expert_noise_std", "saved_dtype")}
    paths = {"base": root / "base", **{e: root / e for e in EXPERTS}}
    if (root / "stamp.json").is_file() and json.loads((root / "stamp.json").read_text()) == stamp and all(
            (p / "config.json").is_file() for p in paths.values()):
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    torch.manual_seed(CONFIG["model_seed"])
    model = LlamaForCausalLM(LlamaConfig(**CONFIG["model"]))
    model.save_pretrained(paths["base"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for e, seed in zip(EXPERTS, CONFIG["expert_seeds"], strict=True):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + CONFIG["expert_noise_std"] * torch.randn(p.shape, generator=gen))
        model.save_pretrained(paths[e])
    (root / "stamp.json").write_text(json.dumps(stamp))
    return paths


def plan_dict(method: str, m: dict[str, Path], dtype: str, density: float | None = None) -> dict:
    """The benchmark's plan for ``method`` (CONFIG's weights and density)."""
    density = CONFIG["density"] if density is None else density
    d: dict = {"merge_method": method, "dtype": dtype, "random_seed": CONFIG["random_seed"]}
    experts = [str(m[e]) for e in EXPERTS]
    if method == "linear":
        d["models"] = [{"model": e, "parameters": {"weight": w}} for e, w in zip(experts, CONFIG["weights"],
                                                                                strict=True)]
        return d
    from mergesearch.merging.methods import get_method

    per = get_method(method).per_input
    d["base_model"] = str(m["base"])
    d["models"] = [{"model": e, "parameters": {"weight": w, **({"density": density} if "density" in per else {})}}
                   for e, w in zip(experts, CONFIG["weights"], strict=True)]
    return d


def n_params(m: dict[str, Path]) -> int:
    from mergesearch.models import Checkpoint

    return sum(torch.Size(s).numel() for s in Checkpoint(str(m["base"])).shapes.values())


# ------------------------------------------------------------------------------------------ in-place part


def in_place(m: dict[str, Path], dtype: str, methods: list[str], bandwidth: dict[int, list[dict]],
             new_density: bool = True, on_method=None) -> list[dict]:
    """Time every method at every thread count on one ResidentMerger of ``dtype``; triads around each method."""
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan

    numel = n_params(m)
    t = time.perf_counter()
    merger = ResidentMerger(str(m["base"]), [str(m[e]) for e in EXPERTS], dtype=dtype)
    print(f"[{dtype}] ResidentMerger built in {time.perf_counter() - t:.1f}s (load {load1()})", flush=True)

    def measure_triads() -> dict[int, float]:
        got = {}
        for th in CONFIG["threads"]:
            bandwidth[th].append({**triad(CONFIG["triad_mib"], th, CONFIG["triad_repeat"]), "load1": load1()})
            got[th] = bandwidth[th][-1]["gbps"]
        return got

    rows = []
    for method in methods:
        plan = MergePlan.model_validate(plan_dict(method, m, dtype))
        torch.set_num_threads(max(CONFIG["threads"]))
        t = time.perf_counter()
        merger.apply(plan)  # fills this method's caches (|τ| key counts, draws, L1 tables, ranks, raw inputs)
        cold = time.perf_counter() - t
        before = measure_triads()
        first = len(rows)
        for th in CONFIG["threads"]:
            torch.set_num_threads(th)
            for _ in range(CONFIG["warmup"]):
                merger.apply(plan)
            load_before = load1()
            warm, warm_cpu = best_of_cpu(lambda p=plan, mg=merger: mg.apply(p), CONFIG["repeat"])
            warm_new = None
            if new_density:  # what a search sees: every trial a new density (caches reused)
                new = [MergePlan.model_validate(plan_dict(method, m, dtype, d)) for d in CONFIG["new_densities"]]
                warm_new = best_of(lambda it=iter(new), mg=merger: mg.apply(next(it)), CONFIG["new_density_repeat"])
            row = {"method": method, "dtype": dtype, "threads": th, "cold_s": round(cold, 3),
                   "warm_s": round(warm, 4), "warm_cpu_s": round(warm_cpu, 4),
                   "warm_new_density_s": None if warm_new is None else round(warm_new, 4),
                   "bytes": ideal_bytes(method, numel, len(EXPERTS), _ELEM[dtype]),
                   "load1_before": load_before, "load1_after": load1()}
            print(json.dumps(row), flush=True)
            rows.append(row)
        after = measure_triads()
        for r in rows[first:]:  # the bandwidth the machine gave right around this method's timings
            r["triad_gbps_adjacent"] = round(max(before[r["threads"]], after[r["threads"]]), 2)
        if on_method is not None:  # partial results survive an interrupted run
            on_method(rows)
    torch.set_num_threads(max(CONFIG["threads"]))
    return rows


def finish_in_place(result: dict) -> None:
    """Floors, ratios and target marks for every stored in-place row, from the best bandwidth per thread count.

    The best bandwidth is taken over every triad stored in ``result`` (all parts run so far), so rows measured
    in separate runs share one floor.
    """
    bw = result.get("bandwidth", {})
    best = {int(th): max(r["gbps"] for r in runs) for th, runs in bw.items() if runs}
    rows = [r for dt in result.get("in_place", {}).values() for r in dt]
    for r in rows:
        gbps = best.get(r["threads"])
        if gbps is None:
            continue
        r["floor_s"] = round(r["bytes"] / (gbps * 1e9), 4)
        r["ratio"] = round(r["warm_s"] / r["floor_s"], 2)
        nd = r.get("warm_new_density_s")
        r["ratio_new_density"] = None if nd is None else round(nd / r["floor_s"], 2)
        if r.get("triad_gbps_adjacent"):  # against the bandwidth measured next to it (contention shared)
            r["floor_adjacent_s"] = round(r["bytes"] / (r["triad_gbps_adjacent"] * 1e9), 4)
            r["ratio_adjacent"] = round(r["warm_s"] / r["floor_adjacent_s"], 2)
            if r.get("warm_cpu_s") is not None and r["threads"] == 1:  # one thread: CPU time excludes waiting
                r["ratio_cpu_adjacent"] = round(r["warm_cpu_s"] / r["floor_adjacent_s"], 2)
        r["target"] = TARGETS.get(r["method"])
        r["met"] = None if r["target"] is None else r["ratio"] <= r["target"]
    by = {(r["method"], r["dtype"], r["threads"]): r for r in rows}
    for (method, dtype, th), r in by.items():
        f = by.get((method, "float32", th))
        if dtype == "bfloat16" and f is not None:
            per_byte = (r["warm_s"] / r["bytes"]) / (f["warm_s"] / f["bytes"])
            r["bf16_per_byte_vs_f32"] = round(per_byte, 2)
            r["bf16_per_byte_met"] = per_byte <= BF16_PER_BYTE_TARGET
    result["best_gbps"] = {str(k): round(v, 2) for k, v in best.items()}


def print_in_place(result: dict) -> None:
    print(f"\nbest triad bandwidth (write-allocate GB/s) by threads: {result.get('best_gbps')}")
    print(f"{'method':17} {'dtype':9} {'thr':>3} {'warm s':>8} {'cpu s':>7} {'new-d s':>8} {'floor s':>8} "
          f"{'ratio':>6} {'target':>6} {'met':>5} {'adj.GB/s':>8} {'adj.ratio':>9} {'bf16/B':>7} {'load':>5}")
    for dt in result.get("in_place", {}).values():
        for r in dt:
            bf = r.get("bf16_per_byte_vs_f32")
            bf_s = "" if bf is None else f"{bf:.2f}{'' if r['bf16_per_byte_met'] else '!'}"
            tgt = r.get("target")
            met = "" if r.get("met") is None else ("yes" if r["met"] else "MISS")
            nd = r.get("warm_new_density_s")
            cpu = r.get("warm_cpu_s")
            print(f"{r['method']:17} {r['dtype']:9} {r['threads']:>3} {r['warm_s']:>8.3f} "
                  f"{'' if cpu is None else format(cpu, '.3f'):>7} "
                  f"{'' if nd is None else format(nd, '.3f'):>8} {r.get('floor_s', float('nan')):>8.3f} "
                  f"{r.get('ratio', float('nan')):>6.2f} {'' if tgt is None else tgt:>6} {met:>5} "
                  f"{r.get('triad_gbps_adjacent', float('nan')):>8.2f} {r.get('ratio_adjacent', float('nan')):>9.2f} "
                  f"{bf_s:>7} {r['load1_before']:>5}")


# ------------------------------------------------------------------------------------------------ e2e part


def _load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _run_timed(cmd: list[str], env: dict) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    return wall, p.stderr


def end_to_end(m: dict[str, Path], work: Path, dtype: str, mergekit_yaml: str | None) -> dict:
    """``mergesearch merge`` vs ``mergekit-yaml`` on one TIES config in ``dtype``; outputs compared."""
    import yaml

    from mergesearch.merging.run import merge_config

    cfg = work / f"ties_{dtype}.yml"
    plan = plan_dict("ties", m, dtype)
    plan.pop("random_seed")
    cfg.write_text(yaml.safe_dump(plan))
    threads = CONFIG["e2e_threads"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    ours_dir, theirs_dir = work / f"ours_{dtype}", work / f"theirs_{dtype}"
    for d in (ours_dir, theirs_dir, work / f"inproc_{dtype}"):
        shutil.rmtree(d, ignore_errors=True)
    cli = shutil.which("mergesearch")
    cmd = [cli] if cli else [sys.executable, "-m", "mergesearch.cli"]
    res: dict = {"dtype": dtype, "threads": threads, "load1_before": load1()}
    res["mergesearch_merge_s"] = round(_run_timed([*cmd, "merge", str(cfg), str(ours_dir)], env)[0], 2)
    torch.set_num_threads(threads)
    t = time.perf_counter()
    merge_config(cfg, work / f"inproc_{dtype}")
    res["merge_config_in_process_s"] = round(time.perf_counter() - t, 2)
    shutil.rmtree(work / f"inproc_{dtype}", ignore_errors=True)
    if not mergekit_yaml or not Path(mergekit_yaml).is_file():
        res["mergekit"] = f"skipped: mergekit-yaml not found at {mergekit_yaml!r}"
        print(json.dumps(res), flush=True)
        return res
    # the synthetic checkpoints have no tokenizer: nothing to copy on either side
    mk_cmd = [mergekit_yaml, str(cfg), str(theirs_dir), "--no-copy-tokenizer"]
    res["mergekit_command"] = " ".join([*mk_cmd[:1], "CONFIG", "OUT", *mk_cmd[3:]])
    res["mergekit_yaml_s"] = round(_run_timed(mk_cmd, env)[0], 2)
    res["speedup"] = round(res["mergekit_yaml_s"] / res["mergesearch_merge_s"], 2)
    res["speedup_target"] = E2E_TARGET
    res["speedup_met"] = res["speedup"] >= E2E_TARGET
    res["load1_after"] = load1()
    res.update(compare_ties_outputs(m, _load_dir(ours_dir), _load_dir(theirs_dir), dtype))
    shutil.rmtree(ours_dir, ignore_errors=True)
    shutil.rmtree(theirs_dir, ignore_errors=True)
    print(json.dumps(res), flush=True)
    return res


def compare_ties_outputs(m: dict[str, Path], ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                         dtype: str) -> dict:
    """Count and classify differing entries of two TIES outputs (see :func:`classify_ties_diff`).

    τ is computed as both tools do, in the job dtype (θ_expert − θ_base after casting both); an entry is at a
    cut-off tie when some expert's |τ| there equals that expert's k-th largest |τ| (k = int(density·n)).
    """
    from mergesearch.models import Checkpoint, to_dtype

    if set(ours) != set(theirs):
        return {"error": f"tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}"}
    td = to_dtype(dtype)
    cks = {k: Checkpoint(str(p)) for k, p in m.items()}
    total = {"entries": 0, "differing": 0, "at_cutoff_tie": 0, "one_ulp": 0, "other": 0, "max_abs_other": 0.0}
    for name, x in ours.items():
        y = theirs[name]
        total["entries"] += x.numel()
        if torch.equal(x, y):
            continue
        base = cks["base"].get(name, td)
        at_cut = torch.zeros(x.shape, dtype=torch.bool)
        for e in EXPERTS:
            mag = (cks[e].get(name, td) - base).abs().reshape(-1).float()
            k = max(1, int(CONFIG["density"] * mag.numel()))
            kth = mag.topk(k).values[-1]
            at_cut |= (mag == kth).reshape(x.shape)
        c = classify_ties_diff(x, y, at_cut)
        for key in ("differing", "at_cutoff_tie", "one_ulp", "other"):
            total[key] += c[key]
        total["max_abs_other"] = max(total["max_abs_other"], c["max_abs_other"])
    total["bit_identical_outside_ties_and_1ulp"] = total["other"] == 0
    return total


# --------------------------------------------------------------------------------------------- memory part


def _rss_now() -> dict[str, int]:
    """This process's resident memory now, in bytes: total, anonymous and file-backed (Linux /proc)."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in keys:
                out[keys[k]] = int(v.split()[0]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return out


def _load_engine_kernels() -> None:
    """Run the compiled kernels a TIES search uses once on small tensors: numba, llvmlite and the cached machine
    code get loaded and the kernels' threads start, an overhead of fixed size whatever the model."""
    from mergesearch.merging.methods import get_method
    from mergesearch.merging.ops import group_of
    from mergesearch.merging.sparsify import MagnitudeOrder

    gen = torch.Generator().manual_seed(0)
    n = 1 << 19  # above the kernels' threading threshold
    base = torch.randn(n, generator=gen)
    tensors = [base, *(base + 0.01 * torch.randn(n, generator=gen) for _ in EXPERTS)]
    method = get_method("ties")
    shared = {name: p.default for name, p in method.shared.items()}
    per_input = [{"weight": 1.0}] + [{"weight": 0.5, "density": 0.5}] * len(EXPERTS)
    method.merge(group_of("w", tensors, base_index=0), shared, per_input)
    tau = tensors[1] - base
    MagnitudeOrder(tau).value(n // 3, tau)  # the resident merger's cached path (key counts, bracket pass)


def memory_worker(models_dir: Path, dtype: str) -> None:
    """The measured process: ResidentMerger + TIES plans at several densities.

    ``dtype`` 'none': imports only; 'engine': imports plus the engine's compiled kernels loaded and run once on
    small tensors (the fixed overhead of the merge engine, independent of the model).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401  (resolve the lazy imports)

    if dtype == "none":
        return
    if dtype == "engine":
        _load_engine_kernels()
        return
    import resource

    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan

    phases, now = {}, {}

    def mark(name: str) -> None:  # the peak so far (ru_maxrss, KiB on Linux) and the RSS now, after each phase
        phases[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        now[name] = _rss_now()

    mark("imports")
    m = {"base": models_dir / "base", **{e: models_dir / e for e in EXPERTS}}
    merger = ResidentMerger(str(m["base"]), [str(m[e]) for e in EXPERTS], dtype=dtype)
    mark("ResidentMerger built")
    for d in CONFIG["memory_densities"]:
        merger.apply(MergePlan.model_validate(plan_dict("ties", m, dtype, d)))
        mark(f"ties density {d}")
    print("PHASES " + json.dumps(phases), flush=True)
    print("RSS_NOW " + json.dumps(now), flush=True)

    def nbytes(items) -> int:  # tensors, or cache objects holding tensors (e.g. a compact magnitude order)
        total = 0
        for x in items:
            parts = [x] if isinstance(x, torch.Tensor) else [v for v in vars(x).values()
                                                              if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in parts)
        return total

    print("CACHES " + json.dumps({
        "base_state": nbytes(merger.base_state.values()), "task_vectors": nbytes(merger._deltas.values()),
        "magnitude_orders": nbytes(merger._orders.values()), "raw": nbytes(merger._raw.values()),
        "draws": nbytes(merger._draws.values()), "l1_tables": nbytes(merger._l1.values()),
        "ranks": nbytes(merger._ranks.values()),
        "model_params": nbytes(list(merger.model.parameters()) + list(merger.model.buffers()))}), flush=True)


def _time_v(args: list[str]) -> tuple[dict, str]:
    timer = shutil.which("time") or "/usr/bin/time"
    if not Path(timer).is_file():
        raise RuntimeError("/usr/bin/time not found (apt-get install -y time)")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([timer, "-v", sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    info = parse_time_v(p.stderr)
    if info.get("exit_status", p.returncode) != 0:
        raise RuntimeError(f"memory worker failed: {p.stderr[-2000:]}")
    return info, p.stdout


def memory(models_dir: Path, m: dict[str, Path]) -> dict:
    """Peak RSS of the search-like workload per dtype, minus the import-only process, vs the target.

    ``peak_x_model`` and ``met`` subtract the process that only imports torch + transformers (the strict figure).
    ``peak_x_model_above_engine`` subtracts the process that also loads and runs the engine's compiled kernels on
    small tensors (numba and llvmlite: a fixed ~0.1 GiB, whatever the model): the part that scales with the model.
    ``rss_now_x_model`` is the resident memory after each phase, anonymous and file-backed (the base tensors of a
    float32 job are views of the memory-mapped checkpoint), not net of any baseline.
    """
    numel = n_params(m)

    def baseline(kind: str) -> tuple[int, list[int]]:
        runs = [_time_v(["--memory-worker", kind, "--models-dir", str(models_dir)])[0]["max_rss_kib"]
                for _ in range(2)]
        return min(runs) * 1024, runs

    overhead, base_runs = baseline("none")
    engine, engine_runs = baseline("engine")
    res: dict = {"import_only_peak_rss_bytes": overhead, "import_only_runs_kib": base_runs,
                 "engine_loaded_peak_rss_bytes": engine, "engine_loaded_runs_kib": engine_runs, "by_dtype": {}}
    for dtype in CONFIG["dtypes"]:
        load_before = load1()
        info, out = _time_v(["--memory-worker", dtype, "--models-dir", str(models_dir)])

        def line(tag: str, text: str = out) -> dict:
            return next((json.loads(x[len(tag) + 1:]) for x in text.splitlines() if x.startswith(tag + " ")), {})

        caches, phases, now = line("CACHES"), line("PHASES"), line("RSS_NOW")
        model_bytes = numel * _ELEM[dtype]
        peak = info["max_rss_kib"] * 1024 - overhead
        above_engine = info["max_rss_kib"] * 1024 - engine
        target = memory_target_bytes(model_bytes, len(EXPERTS))
        row = {"dtype": dtype, "model_bytes": model_bytes, "peak_rss_bytes": info["max_rss_kib"] * 1024,
               "peak_minus_import_bytes": peak, "peak_x_model": round(peak / model_bytes, 2),
               "target_x_model": round(target / model_bytes, 2), "met": peak <= target,
               "peak_x_model_above_engine": round(above_engine / model_bytes, 2),
               "met_above_engine": above_engine <= target, "wall_s": info.get("wall_s"),
               "caches_x_model": {k: round(v / model_bytes, 3) for k, v in caches.items()},
               "peak_after_phase_x_model": {k: round((v - overhead) / model_bytes, 2) for k, v in phases.items()},
               "rss_now_x_model": {k: {kind: round(b / model_bytes, 2) for kind, b in v.items()}
                                   for k, v in now.items()},
               "load1_before": load_before, "load1_after": load1()}
        print(json.dumps(row), flush=True)
        res["by_dtype"][dtype] = row
    return res


# ---------------------------------------------------------------------------------------------------- main


def _save(out: Path, update: dict) -> dict:
    result = json.loads(out.read_text()) if out.is_file() else {}
    if result.get("config") not in (None, CONFIG):  # figures of another configuration are not merged in
        result = {}
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(result.get(k), dict):
            result[k].update(v)
        else:
            result[k] = v
    finish_in_place(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-place", action="store_true", help="the in-place part (default when no part is named)")
    ap.add_argument("--e2e", action="store_true", help="mergesearch merge vs mergekit-yaml")
    ap.add_argument("--memory", action="store_true", help="peak RSS of the resident TIES workload")
    ap.add_argument("--dtypes", default=",".join(CONFIG["dtypes"]))
    ap.add_argument("--methods", default=",".join(CONFIG["methods"]))
    ap.add_argument("--mergekit-yaml", default=os.environ.get("MERGEKIT_YAML", "/tmp/mkvenv/bin/mergekit-yaml"))
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/mergesearch-bench-models"),
                    help="where the synthetic checkpoints are built (reused across runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-new-density", action="store_true",
                    help="do not time the extra new-density merges (shorter run on a loaded machine)")
    ap.add_argument("--fresh", action="store_true", help="start a new JSON instead of updating the stored one")
    ap.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker is not None:
        memory_worker(args.models_dir, args.memory_worker)
        return
    if args.fresh and args.out.is_file():
        args.out.unlink()
    dtypes = args.dtypes.split(",")
    print(f"machine: {json.dumps(machine_info())}", flush=True)
    t = time.perf_counter()
    m = build_models(args.models_dir)
    print(f"models ready in {time.perf_counter() - t:.1f}s ({n_params(m):,} parameters)", flush=True)
    torch.set_num_threads(max(CONFIG["threads"]))
    run_in_place = args.in_place or not (args.e2e or args.memory)
    result: dict = {}
    if run_in_place:
        bandwidth: dict[int, list[dict]] = {th: [] for th in CONFIG["threads"]}
        stored = json.loads(args.out.read_text()).get("bandwidth", {}) if args.out.is_file() else {}

        def save(dt: str, rows: list[dict]) -> dict:
            merged_bw = {str(th): [*stored.get(str(th), []), *runs] for th, runs in bandwidth.items()}
            return _save(args.out, {"config": CONFIG, "params": n_params(m), "bandwidth": merged_bw,
                                    "in_place": {dt: rows}, "machine_in_place": {dt: machine_info()}})

        for dt in dtypes:
            result = save(dt, in_place(m, dt, args.methods.split(","), bandwidth, not args.skip_new_density,
                                       lambda rows, dt=dt: save(dt, rows)))
        print_in_place(result)
    if args.e2e:
        e2e = {dt: end_to_end(m, args.models_dir, dt, args.mergekit_yaml) for dt in dtypes}
        result = _save(args.out, {"config": CONFIG, "params": n_params(m), "end_to_end": e2e,
                                  "machine_e2e": machine_info()})
    if args.memory:
        result = _save(args.out, {"config": CONFIG, "params": n_params(m), "memory": memory(args.models_dir, m),
                                  "machine_memory": machine_info()})
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
