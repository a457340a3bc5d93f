"""hm3's value model against BoTorch's MixedSingleTaskGP, offline, on the plans the HM3 benchmark evaluated.

Why hm3 fits its own Gaussian process (:class:`~mergesearch.search.optimizers.hm3.ValueGP`) rather than a
maintained library's mixed-space GP: this measures how well each predicts what the search evaluates next. For
every stored ``hm3`` and ``gp`` run of the given ``benchmarks/hm3.py`` result files (demo layer space: 8 slots of
6 choices and 3 expert weights; 3 accuracies and l1), each model is fitted on the run's first k trials
(k in ``--ks``) and predicts the next ``--horizon`` trials, in hm3's training units (:class:`Scale` of the first
k). Reported per objective, averaged over runs and k: the median negative log predictive density (calibration),
the mean absolute error and Spearman's rank correlation (what a choice among candidates needs), and the fit and
prediction time.

- ``ours``: ``ValueGP`` as hm3 fits it at every ask (grid marginal likelihood, no optimiser).
- ``mixed``: ``botorch.models.MixedSingleTaskGP`` per objective (Hamming kernel with a length scale per slot,
  RBF with ARD over the weights, sum + product), standardised targets, fitted by ``fit_gpytorch_mll`` (L-BFGS,
  torch seed 0).

The plans are read back from the runs' stored summaries, whose weights are rounded to 2 decimals: both models see
the same rounded inputs.

    python benchmarks/hm3_value_models.py benchmarks/results/hm3_value_gp.json [--ks 30,60,90] [--horizon 15]

Writes ``benchmarks/results/hm3_value_models.json`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "hm3_value_models.json"
PATH_CHARS = "-Mb012"  # a summary's layer string: skip, merged, base, expert 0/1/2 (equality is all a kernel needs)
SIGNS = np.array([-1.0, -1.0, -1.0, 1.0])  # the demo's objectives as minimised: three accuracies, l1


def parse(summary: str) -> tuple[list[int], list[float]]:
    """(path as choice indices, weights) of a stored summary ``task_arithmetic w=[.5,.3,0] layers=4:MM0M----``."""
    weights = re.search(r"w=\[([^\]]*)\]", summary)
    if weights is None or ":" not in summary:
        raise ValueError(f"not a layer-space summary: {summary!r}")
    return [PATH_CHARS.index(c) for c in summary.rsplit(":", 1)[1]], [float(x or 0) for x in
                                                                      weights.group(1).split(",")]


def runs_of(files: list[Path], optimizers: set[str]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        for name, runs in json.loads(f.read_text())["runs"].items():
            if name not in optimizers:
                continue
            for r in runs:
                paths, X = zip(*(parse(s) for s in r["summaries"]), strict=True)
                out.append({"file": f.name, "optimizer": name, "seed": r["seed"], "paths": np.array(paths),
                            "X": np.array(X), "F": np.asarray(r["values"], dtype=float) * SIGNS})
    return out


def ours(paths: np.ndarray, X: np.ndarray, G: np.ndarray, pt: np.ndarray, xt: np.ndarray):
    from mergesearch.search.optimizers.hm3 import ValueGP

    return ValueGP(paths.shape[1], 16, 0).fit(paths, X, G).predict(pt, xt)


def mixed(paths: np.ndarray, X: np.ndarray, G: np.ndarray, pt: np.ndarray, xt: np.ndarray):
    import torch
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import MixedSingleTaskGP
    from gpytorch.mlls import ExactMarginalLogLikelihood

    train = torch.as_tensor(np.concatenate([X, paths], 1), dtype=torch.double)
    test = torch.as_tensor(np.concatenate([xt, pt], 1), dtype=torch.double)
    cat = list(range(X.shape[1], train.shape[1]))
    mu, sd = [], []
    for j in range(G.shape[1]):
        model = MixedSingleTaskGP(train, torch.as_tensor(G[:, [j]], dtype=torch.double), cat_dims=cat)
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))
        with torch.no_grad():
            post = model.posterior(test)
        mu.append(post.mean[:, 0].numpy())
        sd.append(post.variance[:, 0].clamp_min(1e-12).sqrt().numpy())
    return np.stack(mu, 1), np.stack(sd, 1)


MODELS = {"ours": ours, "mixed": mixed}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from mergesearch.search.optimizers.hm3 import Scale

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--ks", default="30,60,90")
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument("--optimizers", default="hm3,gp")
    p.add_argument("--models", default="ours,mixed")
    p.add_argument("--out", type=Path, default=RESULT)
    a = p.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    names = a.models.split(",")
    runs = runs_of(a.files, set(a.optimizers.split(",")))
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    seconds = dict.fromkeys(names, 0.0)
    for run in runs:
        for k in ks:
            scale = Scale(run["F"][:k])
            G, Gt = scale(run["F"][:k]), scale(run["F"][k:k + a.horizon])
            for n in names:
                t = time.perf_counter()
                mu, sd = MODELS[n](run["paths"][:k], run["X"][:k], G, run["paths"][k:k + a.horizon],
                                   run["X"][k:k + a.horizon])
                seconds[n] += time.perf_counter() - t
                nll = 0.5 * np.log(2 * np.pi * sd ** 2) + 0.5 * ((Gt - mu) / sd) ** 2
                rows[n].append({"run": f"{run['optimizer']}/{run['seed']}", "k": k,
                                "median_nll": np.median(nll, 0).tolist(), "mae": np.abs(Gt - mu).mean(0).tolist(),
                                "spearman": [float(spearmanr(mu[:, j], Gt[:, j]).statistic) for j in range(4)]})
    summary = {n: {key: np.round(np.nanmean([r[key] for r in rows[n]], 0), 3).tolist()
                   for key in ("median_nll", "mae", "spearman")} | {"seconds": round(seconds[n], 1)}
               for n in names}
    lines = ["objective order: reverse, swap, sort (accuracies), l1; hm3 training units; lower nll/mae, higher "
             "spearman is better"]
    for n in names:
        s = summary[n]
        lines.append(f"{n:6s} nll {s['median_nll']}  mae {s['mae']}  spearman {s['spearman']}  {s['seconds']} s")
    table = "\n".join(lines)
    print(table)
    out = {"files": [f.name for f in a.files], "ks": ks, "horizon": a.horizon, "optimizers": a.optimizers,
           "fits": len(runs) * len(ks), "seed": 0, "summary": summary, "rows": rows, "table": table,
           "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
