"""Real checkpoints in half precision: merges on a tiny Llama stay finite and match float32, and a merge that
overflows is refused — by `mergesearch merge` with the tensor's name and a non-zero exit, and in a search as one
failed trial while the study goes on."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from mergesearch.merging import run as runmod
from mergesearch.merging.apply import ResidentMerger
from mergesearch.merging.plan import MergePlan
from tests.conftest import write_job
from tests.support.cli import run_cli

HALF = [torch.bfloat16, torch.float16]


def _plan(models, method: str, dtype: str, weight: float = 1.0, lam: float = 1.0,
          normalize: bool | None = None) -> MergePlan:
    extra = {} if normalize is None else {"normalize": normalize}
    return MergePlan.model_validate({
        "merge_method": method, "base_model": str(models["base"]), "dtype": dtype, "random_seed": 3,
        "parameters": {"lambda": lam, **extra},
        "models": [{"model": str(models[k]), "parameters": {"weight": weight, "density": 0.5}} for k in "ab"]})


@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """bfloat16 and float16 checkpoints of a tiny Llama and two experts a few units in the last place away from it
    (|τ| ≲ 6 % of |θ|, like a real fine-tune's): θi − θ0 is then exact in the half dtype (Sterbenz)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("half")
    src = make_tiny_llama(root / "f32", 0)
    gen = torch.Generator().manual_seed(0)
    out: dict[str, dict[str, Path]] = {}
    for dtype in HALF:
        name = str(dtype).removeprefix("torch.")
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        out[name] = {}
        for k in ("base", "a", "b"):
            with torch.no_grad():
                for key, p in model.state_dict().items():
                    steps = torch.randint(-8, 9, p.shape, generator=gen, dtype=torch.int16)
                    steps[base_state[key].abs() < 1e-3] = 0  # (e.g. the padding row: 0's bits − 1 are a NaN)
                    bits = base_state[key].view(torch.int16)
                    p.copy_(base_state[key] if k == "base" else (bits + steps).view(dtype))
            model.save_pretrained(root / name / k)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                (root / name / k / f).write_bytes((src / f).read_bytes())
            out[name][k] = root / name / k
    return out


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della", "task_arithmetic", "sce"])
def test_half_precision_merge_of_tiny_llama_is_the_float32_merge_rounded_once(half_models, method, dtype):
    """A half-precision checkpoint merged in its own dtype gives the float32 merge of the same checkpoint, rounded
    once (mergekit, computing in the half dtype, is off by several units in places)."""
    name = str(dtype).removeprefix("torch.")
    models = half_models[name]
    base, cks = runmod.open_models(_plan(models, method, name))
    _, half = runmod.merge_plan_tensors(_plan(models, method, name), base, cks)
    _, full = runmod.merge_plan_tensors(_plan(models, method, "float32"), base, cks)
    for key, t in half.items():
        assert t.dtype == dtype and torch.isfinite(t).all(), key
        assert torch.equal(t, full[key].to(dtype)), key
        assert not torch.equal(t, cks[base].get(key, dtype, "cpu")), key  # the merge did something


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_resident_half_precision_merge_equals_one_shot_merge(tiny_models, dtype):
    plan = _plan(tiny_models, "ties", dtype)
    merger = ResidentMerger(str(tiny_models["base"]), [str(tiny_models[k]) for k in "ab"], dtype=dtype)
    state = merger.apply(plan).state_dict()
    base, models = runmod.open_models(plan)
    _, tensors = runmod.merge_plan_tensors(plan, base, models)
    for key, t in tensors.items():
        assert torch.equal(state[key], t), key


def test_merge_command_refuses_an_overflowing_merge(tiny_models, tmp_path: Path, capsys):
    # |τ| ≈ 0.02 here: 1e38 · 0.02 · 2 models · λ 100 overflows float32 (and bfloat16)
    plan = _plan(tiny_models, "ties", "bfloat16", weight=1e38, lam=100.0, normalize=False)
    cfg = tmp_path / "merge.yaml"
    from mergesearch.merging.plan import plan_to_yaml

    cfg.write_text(plan_to_yaml(plan))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", str(cfg), str(out)], capsys)
    assert code != 0
    err = err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and "(method ties)" in err[0] and "model." in err[0]
    assert "Traceback" not in err[0]
    assert not out.exists()  # nothing half-written


def test_search_stores_an_overflowing_trial_as_failed_and_goes_on(tiny_models, tmp_path: Path, capsys):
    # one recipe that overflows, then ordinary trials
    job = write_job(tmp_path, tiny_models, extra="")
    text = job.read_text().replace("weight: [0, 1]", "weight: [0, 1.0e+38]").replace(
        "seed: 0}", "seed: 0, initial: [{method: task_arithmetic, weight.0: 1.0e+38, weight.1: 1.0e+38, lambda: 100}, "
        "{method: task_arithmetic, weight.0: 0.5, weight.1: 0.5}]}").replace(
        "space: {", "dtype: bfloat16\nspace: {lambda: [0, 100], ")
    job.write_text(text)
    url = f"sqlite:///{tmp_path / 'nf.db'}"
    assert run_cli(["run", str(job), "--storage", url, "--study", "nf", "--no-progress", "--trials", "2"],
                   capsys)[0] == 0
    trials = optuna.load_study(study_name="nf", storage=url).trials
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed, [t.state for t in trials]
    reason = " ".join(str(v) for v in failed[0].user_attrs.values())
    assert "non-finite" in reason and "task_arithmetic" in reason
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 2  # the study went on
