"""Compare ``mergesearch merge`` with mergekit 0.1.5, every method of the table × float32, bfloat16, float16.

For each method of ``mergesearch.merging.methods.METHODS`` (written for mergekit as ``Method.mergekit`` via
``plan.mergekit_equivalent``, e.g. ``dare_linear_invdensity`` -> mergekit's ``dare_linear`` with rescale off
and weights w/d; a method mergekit cannot replay is listed as skipped, with the reason) and each dtype, one
config over a tiny random Llama base and three noisy experts, *stored in that dtype*:

* ours: ``merge_config`` of the config; mergekit: ``run_merge`` of the same config in a throwaway venv
  (``--mergekit-python``, or MERGEKIT_PYTHON; the script stops with a note when it is absent);
* reference: ``merge_config`` of the same config with ``dtype: float64`` (the stored inputs upcast exactly),
  i.e. the float64-exact result of the same semantics;
* both outputs' max / mean absolute error against the reference, and the accuracy rule of the issue: at every
  entry |ours − ref| ≤ |mergekit − ref| + 1 ulp, the ulp of the dtype at the inputs' magnitude there
  (max of |θᵢ| over the config's inputs of that tensor name and |ref|). Reported per (method, dtype): the
  fraction of entries violating it and the worst excess in ulps, ``(|ours − ref| − |mk − ref|) / ulp − 1``
  (> 0 is a violation). Magnitude-selected methods keep every entry tied with the density cut-off, mergekit an
  arbitrary subset; in half precision τ = θ − θ0 is itself rounded, so such ties are common. TIES' sign
  election has near ties too (:func:`sign_ties`): both are reported apart, as violations at a tie.
* random methods (DARE, DELLA: mergekit draws its masks from its own generator) cannot match bit for bit:
  their mergekit output is compared by statistics instead — fraction of entries changed from the base and the
  L1 norm of the change, ours / mergekit (pass: within 5 % and 0.02) — and ours is still checked against the
  float64 reference, which uses the same seeded masks. ``arcee_fusion`` samples only above 1M entries per
  tensor (quantile estimate); every tensor here is smaller, so it is compared exactly.

    python benchmarks/compare_mergekit.py --mergekit-python /tmp/mkvenv/bin/python     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from merge_speed import engine_revision  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RESULTS = Path(__file__).parent / "results" / "compare_mergekit.json"
DTYPES = ("float32", "bfloat16", "float16")
#: tiny model and data, fixed before running
SETUP = {"layers": 4, "hidden": 64, "base_seed": 0, "expert_seeds": [1, 2, 3], "expert_noise": 0.02,
         "random_seed": 0}
#: statistics tolerance for random methods: |L1 ratio − 1| and |changed fraction difference|
STAT_TOL = (0.05, 0.02)
#: tensors above this many entries make arcee_fusion sample its quantiles (then it is random)
ARCEE_SAMPLE = 1_000_000

# Runs inside the mergekit venv: one process for all configs (mergekit's import costs ~10 s); one JSON line per
# config, failures reported, not raised.
_RUNNER = """
import json, sys, time, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    t = time.perf_counter()
    try:
        conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
        run_merge(conf, out, MergeOptions(random_seed=0, quiet=True, write_model_card=False))
        print("MK " + json.dumps({"cfg": cfg, "ok": True, "s": time.perf_counter() - t}), flush=True)
    except Exception as e:
        print("MK " + json.dumps({"cfg": cfg, "ok": False, "error": (type(e).__name__ + ": " + str(e))[:300],
                                  "where": traceback.format_exc().splitlines()[-3:]}), flush=True)
"""


# ------------------------------------------------------------------------------------------- pure helpers


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at magnitude |x| (float64; the subnormal spacing near 0)."""
    fi = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]
    e = torch.floor(torch.log2(torch.clamp(x.abs().double(), min=fi.tiny)))
    return torch.exp2(e - mant)


def accuracy_rule(ours: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, unit: torch.Tensor,
                  at_tie: torch.Tensor | None = None) -> dict:
    """|ours − ref| ≤ |theirs − ref| + unit, entry by entry (all float64 after conversion).

    Args:
        at_tie: entries at a tie of the method (a magnitude cut-off tie, or a near tie of TIES' sign election):
            reported apart; may be None.

    Returns:
        {"entries", "violations", "violations_at_tie", "worst_excess_ulps" (max of (|o − r| − |t − r|)/unit − 1;
        ≤ 0 is fine), "worst_excess_ulps_not_at_tie", "ours_max", "ours_sum", "theirs_max", "theirs_sum"
        (absolute errors against ref)}.
    """
    r = ref.double()
    eo, et = (ours.double() - r).abs(), (theirs.double() - r).abs()
    excess = (eo - et) / unit - 1
    tie = torch.zeros_like(excess, dtype=torch.bool) if at_tie is None else at_tie.reshape(excess.shape)
    bad = excess > 0
    rest = excess[~tie]
    return {"entries": eo.numel(), "violations": int(bad.sum()), "violations_at_tie": int((bad & tie).sum()),
            "worst_excess_ulps": float(excess.max()) if excess.numel() else 0.0,
            "worst_excess_ulps_not_at_tie": float(rest.max()) if rest.numel() else -1.0,
            "ours_max": float(eo.max()), "ours_sum": float(eo.sum()), "theirs_max": float(et.max()),
            "theirs_sum": float(et.sum())}


def cutoff_ties(taus: list[torch.Tensor], params: list[dict], sparsifier: str) -> torch.Tensor:
    """Entries where some expert's |τ| equals a magnitude cut-off of its selection (ties there are kept by us
    and broken arbitrarily by mergekit's argsort). ``taus`` in the job dtype, as both tools compute them.

    Args:
        params: per expert {"density", "gamma"} (plain numbers).
        sparsifier: ``magnitude`` (cut at the k-th largest, k = max(1, int(d·n))) or ``magnitude_outliers``
            (the two band edges of Model Breadcrumbs).
    """
    from mergesearch.merging.sparsify import outliers_band

    out = torch.zeros(taus[0].shape, dtype=torch.bool)
    for tau, p in zip(taus, params, strict=True):
        a = tau.float().abs()
        d, n = float(p.get("density", 1.0)), a.numel()
        if d >= 1 or d <= 0 or n == 0:
            continue
        if sparsifier == "magnitude":
            edges = [a.reshape(-1).topk(max(1, int(d * n))).values[-1]]
        else:
            lo, hi = outliers_band(a, d, float(p.get("gamma", 0.01)))
            edges = [e for e in (lo, hi) if e is not None]
        for e in edges:
            out |= a == e
    return out


def sign_tie_jobs(cfg: dict) -> dict:
    """Output tensor name -> its resolved job (per-tensor weights, densities) for a ``models:`` config."""
    from mergesearch.merging.plan import MergePlan
    from mergesearch.merging.resolve import resolve
    from mergesearch.models import Checkpoint

    plan = MergePlan.model_validate(cfg)
    infos = {p: Checkpoint(p) for p in _inputs_of(cfg)}
    return {j.name: j for j in resolve(plan, infos, cfg["base_model"]).jobs}


def sign_ties(taus: list[torch.Tensor], params: list[dict], sparsifier: str, dtype: torch.dtype) -> torch.Tensor:
    """Entries where TIES' sign election is a near tie *of the method*: |Σ u| of the exact computation (float64
    τ from the stored inputs, each expert's own selection) is within what rounding τ to ``dtype`` can move it,
    dtype's eps · Σ|u| (twice the bound). Both tools hold τ in the job dtype, so there either may elect the other
    sign than the exact result; an error there is the method's discontinuity, not arithmetic, and is reported
    apart like a cut-off tie (the conformance suite skips the same entries).

    Args:
        taus: exact task vectors (float64) of one tensor; ``params`` per expert, resolved for this tensor
            ({"weight", "density", "gamma"}).
    """
    from mergesearch.merging.sparsify import outliers_band

    s = torch.zeros(taus[0].shape, dtype=torch.float64)
    size = torch.zeros_like(s)
    for tau, p in zip(taus, params, strict=True):
        a, d = tau.abs(), float(p.get("density", 1.0))
        keep = torch.ones_like(a, dtype=torch.bool)
        if 0 < d < 1 and a.numel():
            if sparsifier == "magnitude":
                keep = a >= a.reshape(-1).topk(max(1, int(d * a.numel()))).values[-1]
            else:
                lo, hi = outliers_band(a, d, float(p.get("gamma", 0.01)))
                keep = (a >= lo if lo is not None else keep) & (a <= hi if hi is not None else keep)
        elif d <= 0:
            keep = torch.zeros_like(keep)
        u = float(p["weight"]) * tau * keep
        s += u
        size += u.abs()
    return s.abs() <= torch.finfo(dtype).eps * size


def change_stats(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(L1 norm of merged − base, fraction of entries changed) over every tensor."""
    l1 = sum((merged[k].double() - base[k].double()).abs().sum().item() for k in merged)
    changed = sum((merged[k] != base[k]).sum().item() for k in merged)
    return l1, changed / sum(v.numel() for v in merged.values())


def stats_ok(ours: tuple[float, float], theirs: tuple[float, float], tol: tuple[float, float] = STAT_TOL) -> bool:
    """Random methods: L1 ratio within tol[0] of 1 and changed fractions within tol[1]."""
    return theirs[0] > 0 and abs(ours[0] / theirs[0] - 1) <= tol[0] and abs(ours[1] - theirs[1]) <= tol[1]


def configs(base: str, a: str, b: str, c: str) -> dict[str, dict]:
    """One config per method of the table (keys are method names), without dtype; paths as given."""
    three = lambda params: [{"model": m, "parameters": p} for m, p in zip((a, b, c), params, strict=True)]  # noqa: E731
    wd = [{"weight": 0.5, "density": 0.5}, {"weight": [0.2, 0.8], "density": 0.7},
          {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}], "density": 0.3}]
    plain = [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.6, "density": 0.3}]
    w = [{"weight": 0.5}, {"weight": [0.2, 0.8]}, {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}]
    tv = {"base_model": base}
    return {
        "linear": {"models": three([{"weight": 1.0}, {"weight": [0.2, 1.0]}, {"weight": 0.5}])},
        "passthrough": {"slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                                   {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]},
        "slerp": {"models": [{"model": base}, {"model": a}], **tv,
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}},
        "model_stock": {"models": [{"model": m} for m in (a, b, c)], **tv},
        "task_arithmetic": {"models": three(w), "parameters": {"lambda": 0.8}, **tv},
        "ties": {"models": three(wd), **tv},
        "dare_linear": {"models": three(wd), **tv},
        "dare_ties": {"models": three(wd), **tv},
        "dare_linear_invdensity": {"models": three(plain), **tv},
        "dare_ties_invdensity": {"models": three(plain), **tv},
        "breadcrumbs": {"models": three(wd), **tv},
        "breadcrumbs_ties": {"models": three([{**p, "gamma": 0.05} for p in wd]), **tv},
        "della": {"models": three(wd), "parameters": {"epsilon": 0.1}, **tv},
        "della_linear": {"models": three(wd), "parameters": {"epsilon": 0.1}, **tv},
        "sce": {"models": [{"model": m} for m in (a, b, c)], "parameters": {"select_topk": 0.5}, **tv},
        "karcher": {"models": [{"model": m} for m in (a, b, c)], "parameters": {"max_iter": 10, "tol": 1e-5}},
        "nuslerp": {"models": [{"model": a, "parameters": {"weight": 0.3}},
                               {"model": b, "parameters": {"weight": 0.7}}], **tv},
        "multislerp": {"models": three(w)},
        "nearswap": {"models": [{"model": base}, {"model": a}], "parameters": {"t": 0.01}, **tv},
        "arcee_fusion": {"models": [{"model": base}, {"model": a}], **tv},
        "ram": {"models": [{"model": m} for m in (a, b, c)], "parameters": {"epsilon": 0.01}, **tv},
        "ramplus_tl": {"models": [{"model": m} for m in (a, b, c)],
                       "parameters": {"r": 0.1, "alpha": 0.2, "epsilon": 0.01}, **tv},
    }


def is_statistical(method: str, max_numel: int) -> bool:
    """Whether mergekit's output can only be compared by statistics (its own RNG draws the masks)."""
    from mergesearch.merging.methods import get_method

    if method == "arcee_fusion":
        return max_numel > ARCEE_SAMPLE
    return get_method(method).random


# ------------------------------------------------------------------------------------------------- running


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def cast_checkpoint(src: Path, dst: Path, dtype: str) -> Path:
    """A copy of a model directory with every floating tensor stored in ``dtype``."""
    from safetensors.torch import save_file

    from mergesearch.models import to_dtype

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = {k: v.to(to_dtype(dtype)) if v.is_floating_point() else v for k, v in load_dir(src).items()}
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def _inputs_of(cfg: dict) -> list[str]:
    names = [m["model"] for m in cfg.get("models") or []]
    names += [s["model"] for sl in cfg.get("slices") or [] for s in sl["sources"]]
    if cfg.get("base_model"):
        names.append(cfg["base_model"])
    return list(dict.fromkeys(names))


def selection_inputs(method: str, cfg: dict, states: dict[str, dict[str, torch.Tensor]]):
    """(base state, expert states, expert params, sparsifier, consensus) for magnitude-selecting methods with
    plain per-expert densities, else None (no tie classification)."""
    from mergesearch.merging.methods import get_method

    flags = get_method(method).options.get("flags")
    if flags is None or flags.sparsifier not in ("magnitude", "magnitude_outliers") or not cfg.get("models"):
        return None
    shared = cfg.get("parameters") or {}
    experts = [m for m in cfg["models"] if m["model"] != cfg.get("base_model")]
    params = [{**shared, **(m.get("parameters") or {})} for m in experts]
    if not all(isinstance(p.get(k, 0.0), (int, float)) for p in params for k in ("density", "gamma")):
        return None
    return states[cfg["base_model"]], [states[m["model"]] for m in experts], params, flags.sparsifier, flags.consensus


def compare_case(method: str, dtype: str, ours_dir: Path, ref_dir: Path, mk_dir: Path | None, cfg: dict,
                 states: dict[str, dict[str, torch.Tensor]], base_state: dict[str, torch.Tensor]) -> dict:
    """One (method, dtype): errors against the float64 reference, the accuracy rule, statistics when random."""
    from mergesearch.models import to_dtype

    td = to_dtype(dtype)
    ours, ref = load_dir(ours_dir), load_dir(ref_dir)
    row: dict = {"method": method, "dtype": dtype}
    inputs = [states[p] for p in _inputs_of(cfg)]
    max_numel = max(v.numel() for v in ours.values())
    row["statistical"] = is_statistical(method, max_numel)
    theirs = load_dir(mk_dir) if mk_dir is not None else None
    if theirs is not None and set(theirs) != set(ours):
        row["error"] = f"tensor names differ: {sorted(set(theirs) ^ set(ours))[:4]}"
        theirs = None
    tot = {"entries": 0, "violations": 0, "violations_at_tie": 0, "worst_excess_ulps": -1.0,
           "worst_excess_ulps_not_at_tie": -1.0, "ours_max": 0.0, "ours_sum": 0.0, "theirs_max": 0.0,
           "theirs_sum": 0.0}
    bit_equal = 0
    sel = selection_inputs(method, cfg, states)
    jobs = sign_tie_jobs(cfg) if sel is not None and sel[4] else {}
    for name, o in ours.items():
        r = ref[name]
        mag = torch.stack([r.double().abs(), *(s[name].double().abs() for s in inputs if name in s
                                               and s[name].shape == r.shape)]).amax(0)
        unit = ulp(mag, td)
        t = theirs[name] if theirs is not None else o  # without mergekit the rule is vacuous; errors still count
        tie = None
        if sel is not None:
            base_t, experts, params, kind, consensus = sel
            tie = cutoff_ties([e[name] - base_t[name] for e in experts], params, kind)
            if consensus:
                job = jobs[name]
                rows = [(states[m][src], p) for i, ((m, src), p) in enumerate(zip(job.inputs, job.per_input,
                                                                                   strict=True))
                        if i != job.base_index]
                tie |= sign_ties([x.double() - base_t[name].double() for x, _ in rows], [p for _, p in rows],
                                 kind, td)
        res = accuracy_rule(o, t, r, unit, tie)
        if theirs is not None:
            bit_equal += int((o == t).sum())
        for k in ("entries", "violations", "violations_at_tie", "ours_sum", "theirs_sum"):
            tot[k] += res[k]
        for k in ("worst_excess_ulps", "worst_excess_ulps_not_at_tie", "ours_max", "theirs_max"):
            tot[k] = max(tot[k], res[k])
    n = tot["entries"]
    row.update(ours_max_err=tot["ours_max"], ours_mean_err=tot["ours_sum"] / n)
    if theirs is None:
        return row
    row.update(mergekit_max_err=tot["theirs_max"], mergekit_mean_err=tot["theirs_sum"] / n,
               bit_equal_fraction=bit_equal / n,
               max_abs_diff=max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours))
    if row["statistical"]:
        so, st = change_stats(ours, base_state), change_stats(theirs, base_state)
        row.update(l1_ours=so[0], l1_mergekit=st[0], l1_ratio=so[0] / st[0] if st[0] else float("nan"),
                   changed_ours=so[1], changed_mergekit=st[1], ok=stats_ok(so, st),
                   rule="statistics (mergekit's RNG draws different masks)")
    else:
        row.update(rule_violation_fraction=tot["violations"] / n, worst_excess_ulps=tot["worst_excess_ulps"],
                   violations_at_tie=tot["violations_at_tie"],
                   violations_not_at_tie=tot["violations"] - tot["violations_at_tie"],
                   worst_excess_ulps_not_at_tie=tot["worst_excess_ulps_not_at_tie"],
                   ok=tot["violations"] == tot["violations_at_tie"])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", "/tmp/mkvenv/bin/python"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--methods", default="", help="comma-separated subset of the table (default: all)")
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    args = ap.parse_args()
    if not Path(args.mergekit_python).is_file():
        print(f"skipped: no mergekit python at {args.mergekit_python} (python -m venv /tmp/mkvenv && "
              f"/tmp/mkvenv/bin/pip install torch==2.13.0 && /tmp/mkvenv/bin/pip install mergekit==0.1.5)")
        return 0
    torch.set_num_threads(1)
    from conftest import make_tiny_llama

    from mergesearch.merging.methods import METHODS
    from mergesearch.merging.plan import MergePlan, mergekit_equivalent, plan_to_yaml
    from mergesearch.merging.run import merge_config

    wanted = [m for m in METHODS if not args.methods or m in args.methods.split(",")]
    dtypes = args.dtypes.split(",")
    t0 = time.perf_counter()
    rows: list[dict] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = {"base": make_tiny_llama(root / "f32" / "base", seed=SETUP["base_seed"], layers=SETUP["layers"],
                                       hidden=SETUP["hidden"])}
        for n, seed in zip("abc", SETUP["expert_seeds"], strict=True):
            src[n] = make_tiny_llama(root / "f32" / n, seed=seed, base=src["base"], noise=SETUP["expert_noise"])
        cases: list[tuple[str, str, dict, Path, Path]] = []
        mk_argv: list[str] = []
        states: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        for dt in dtypes:
            dirs = {k: (p if dt == "float32" else cast_checkpoint(p, root / dt / k, dt)) for k, p in src.items()}
            states[dt] = {str(p): load_dir(p) for p in dirs.values()}
            for method, body in configs(*(str(dirs[k]) for k in ("base", "a", "b", "c"))).items():
                if method not in wanted:
                    continue
                cfg = {"merge_method": method, **body, "dtype": dt, "random_seed": SETUP["random_seed"]}
                plan = MergePlan.model_validate(cfg)
                mk_plan, why = mergekit_equivalent(plan)
                case = root / "cases" / f"{method}.{dt}"
                case.mkdir(parents=True)
                (case / "ours.yml").write_text(plan_to_yaml(plan))
                (case / "ref.yml").write_text(plan_to_yaml(plan.model_copy(update={"dtype": "float64"})))
                if mk_plan is None:
                    skipped[method] = why
                else:
                    (case / "mk.yml").write_text(plan_to_yaml(mk_plan, strict_mergekit=True))
                    mk_argv += [str(case / "mk.yml"), str(case / "mk")]
                cases.append((method, dt, cfg, case, dirs["base"]))
        missing = [m for m in wanted if m not in {c[0] for c in cases}]
        if missing:
            print(f"methods without a config here (add one to configs()): {missing}")
        t = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([args.mergekit_python, "-c", _RUNNER, *mk_argv], env=env, capture_output=True, text=True)
        mk_status = {json.loads(line[3:])["cfg"]: json.loads(line[3:]) for line in p.stdout.splitlines()
                     if line.startswith("MK ")}
        print(f"mergekit: {len(mk_status)} configs in {time.perf_counter() - t:.1f}s (rc {p.returncode})", flush=True)
        if p.returncode != 0 and not mk_status:
            print(p.stderr[-3000:])
            return 1
        for method, dt, cfg, case, base_dir in cases:
            try:
                merge_config(case / "ours.yml", case / "ours")
                merge_config(case / "ref.yml", case / "ref")
            except Exception as e:  # reported, not raised: one failing method must not hide the others
                rows.append({"method": method, "dtype": dt, "ok": False, "error": f"ours: {type(e).__name__}: {e}"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            st = mk_status.get(str(case / "mk.yml"))
            mk_dir = case / "mk" if st and st["ok"] else None
            row = compare_case(method, dt, case / "ours", case / "ref", mk_dir, cfg, states[dt],
                               states[dt][str(base_dir)])
            if method in skipped:
                row.update(mergekit="skipped: " + skipped[method], ok=None)
            elif mk_dir is None:
                row.update(mergekit=f"failed: {st['error'] if st else 'no status'}", ok=None)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows)
    result = {"setup": SETUP, "dtypes": dtypes, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "torch": torch.__version__, "engine": engine_revision(),
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "wall_s": round(time.perf_counter() - t0, 1), "skipped_methods": skipped, "summary": summary,
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print(f"saved {args.out}")
    return 0 if all(r.get("ok") is not False for r in rows) else 1


def summarize(rows: list[dict]) -> dict:
    """Counts of passing, failing and not-compared (method, dtype) cases."""
    return {"cases": len(rows), "ok": sum(r.get("ok") is True for r in rows),
            "failed": [f"{r['method']}/{r['dtype']}" for r in rows if r.get("ok") is False],
            "not_compared": [f"{r['method']}/{r['dtype']}" for r in rows if r.get("ok") is None]}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'method':23} {'dtype':8} {'ours max':>9} {'mk max':>9} {'ours mean':>9} {'mk mean':>9} "
          f"{'viol.frac':>9} {'excess':>7} {'non-tie':>7} {'excess':>7} {'bit-eq':>6}  ok / note")

    def f(r: dict, k: str, fmt: str = ".2e") -> str:
        v = r.get(k)
        return "" if v is None else format(v, fmt)

    for r in rows:
        note = r.get("mergekit") or r.get("error") or ""
        if r.get("statistical") and "l1_ratio" in r:
            note = f"stats: L1 ratio {r['l1_ratio']:.4f}, changed {r['changed_ours']:.4f}/{r['changed_mergekit']:.4f}"
        print(f"{r['method']:23} {r['dtype']:8} {f(r, 'ours_max_err'):>9} {f(r, 'mergekit_max_err'):>9} "
              f"{f(r, 'ours_mean_err'):>9} {f(r, 'mergekit_mean_err'):>9} "
              f"{f(r, 'rule_violation_fraction', '.1e'):>9} {f(r, 'worst_excess_ulps', '.2f'):>7} "
              f"{f(r, 'violations_not_at_tie', 'd'):>7} {f(r, 'worst_excess_ulps_not_at_tie', '.2f'):>7} "
              f"{f(r, 'bit_equal_fraction', '.3f'):>6}  {r.get('ok')} {note}")


if __name__ == "__main__":
    sys.exit(main())
