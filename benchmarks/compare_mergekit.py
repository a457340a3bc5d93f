"""Compare ``mergesearch merge`` with mergekit 0.1.5 on tiny random Llamas, method by method.

mergekit is not a dependency: point ``--mergekit-python`` (or MERGEKIT_PYTHON) at the python of a throwaway venv
with ``mergekit==0.1.5`` installed; the script skips when it is absent. Deterministic methods must agree to
1e-6 (max abs diff, float32); random ones (DARE, DELLA) are compared statistically: the L1 norm of the merged
change and the fraction of changed entries.

    python benchmarks/compare_mergekit.py --mergekit-python /work/venv-mergekit/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# Runs inside the mergekit venv: one process for all configs (mergekit's import costs ~10 s).
_RUNNER = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(conf, out, MergeOptions(random_seed=0, quiet=True, write_model_card=False))
"""


def configs(root: Path) -> dict[str, dict]:
    """One mergekit config per case, over a 4-layer base and three experts a, b, c."""
    base, a, b, c = (str(root / n) for n in ("base", "a", "b", "c"))
    three = lambda params: [{"model": m, "parameters": p} for m, p in zip((a, b, c), params, strict=True)]  # noqa: E731
    wd = [{"weight": 0.5, "density": 0.5}, {"weight": [0.2, 0.8], "density": 0.7},
          {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}], "density": 0.3}]
    common = {"base_model": base, "dtype": "float32"}
    out = {
        "linear": {"merge_method": "linear", "models": three([{"weight": 1.0}, {"weight": [0.2, 1.0]},
                                                              {"weight": 0.5}]), "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "models": three(wd),
                            "parameters": {"lambda": 0.8}, **common},
        "ties": {"merge_method": "ties", "models": three(wd), **common},
        "ties_int8_nonorm": {"merge_method": "ties", "models": three(wd),
                             "parameters": {"int8_mask": True, "normalize": False}, **common},
        "breadcrumbs": {"merge_method": "breadcrumbs", "models": three(wd), **common},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties",
                             "models": three([{**p, "gamma": 0.05} for p in wd]), **common},
        "slerp": {"merge_method": "slerp", "models": [{"model": base}, {"model": a}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]},
                  **common},
        "model_stock": {"merge_method": "model_stock", "models": [{"model": m} for m in (a, b, c)], **common},
        "model_stock_filter_wise": {"merge_method": "model_stock", "models": [{"model": m} for m in (a, b, c)],
                                    "parameters": {"filter_wise": True}, **common},
        "passthrough_frankenmerge": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3]}]},
            {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}]},
        "ties_slices": {"merge_method": "ties", **common, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]},
                         {"model": a, "layer_range": [0, 2], "parameters": {"weight": 1.0, "density": 0.5}},
                         {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}}]},
            {"sources": [{"model": base, "layer_range": [2, 4]},
                         {"model": c, "layer_range": [2, 4], "parameters": {"weight": 1.0, "density": 0.8}}]}]},
        "dare_ties": {"merge_method": "dare_ties", "models": three(wd), **common},
        "dare_linear": {"merge_method": "dare_linear", "models": three(wd), **common},
        "della": {"merge_method": "della", "models": three(wd), "parameters": {"epsilon": 0.1}, **common},
        "della_linear": {"merge_method": "della_linear", "models": three(wd),
                         "parameters": {"epsilon": 0.1}, **common},
    }
    return out


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(name: str, ours: Path, theirs: Path, base: dict[str, torch.Tensor]) -> dict:
    a, b = load_dir(ours), load_dir(theirs)
    if set(a) != set(b):
        return {"case": name, "ok": False, "error": f"tensor names differ: {sorted(set(a) ^ set(b))[:3]}"}
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    row = {"case": name, "max_abs_diff": diff}
    if name.startswith(("dare", "della")):
        def stats(sd: dict[str, torch.Tensor]) -> tuple[float, float]:
            l1 = sum((sd[k] - base[k]).abs().sum().item() for k in sd)
            changed = sum((sd[k] != base[k]).sum().item() for k in sd) / sum(v.numel() for v in sd.values())
            return l1, changed

        (l1a, ca), (l1b, cb) = stats(a), stats(b)
        row.update(l1_ours=l1a, l1_mergekit=l1b, changed_ours=ca, changed_mergekit=cb,
                   ok=abs(l1a / l1b - 1) < 0.05 and abs(ca - cb) < 0.02)
    else:
        row["ok"] = diff <= 1e-6
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default=os.environ.get("MERGEKIT_PYTHON", "/work/venv-mergekit/bin/python"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compare_mergekit.json")
    ap.add_argument("--only", default="", help="run the cases whose name starts with this")
    args = ap.parse_args()
    if not Path(args.mergekit_python).is_file():
        print(f"skipped: no mergekit python at {args.mergekit_python}")
        return 0
    torch.set_num_threads(1)
    from conftest import make_tiny_llama

    from mergesearch.merging.run import merge_config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_tiny_llama(root / "base", seed=0, layers=4, hidden=64)
        for i, n in enumerate("abc"):
            make_tiny_llama(root / n, seed=i + 1, base=base, noise=0.02)
        cases = {k: v for k, v in configs(root).items() if not args.only or k.startswith(args.only)}
        argv = []
        for name, cfg in cases.items():
            (root / f"{name}.yml").write_text(yaml.safe_dump(cfg))
            argv += [str(root / f"{name}.yml"), str(root / f"mk_{name}")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([args.mergekit_python, "-c", _RUNNER, *argv], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base_sd = load_dir(base)
        rows = []
        for name in cases:
            merge_config(root / f"{name}.yml", root / f"ms_{name}")
            rows.append(compare(name, root / f"ms_{name}", root / f"mk_{name}", base_sd))
            print(json.dumps(rows[-1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
