"""The resident merger's memory layout: each of base, task vectors and model held once, compact caches, same bits.

What issue 14 item 7 counts (peak ≤ (N + 2) × model bytes + 15 %) rests on: the resident model owns its weights
(not views of the memory-mapped checkpoint, which the first merge would copy page by page while the file stays
mapped) and equals a fresh load; task vectors are one tensor each in the working dtype; magnitude orders are
counts by key (no copy of τ) and DELLA ranks uint16. ``benchmarks/merge_speed.py --memory`` measures the peak.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesearch.merging import sparsify as sp
from mergesearch.merging.apply import ResidentMerger, task_vector
from mergesearch.merging.plan import MergePlan
from mergesearch.merging.run import merge_config
from mergesearch.models import Checkpoint


def _save(model, path: Path, dtype: torch.dtype) -> Path:
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, Path]:
    """A base (hidden 96: matrices above the small-tensor limit of a magnitude order) and three experts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    out = {"base": _save(model, root / "base", torch.float32)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate("abc"):
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(state[k] + 0.01 * torch.randn(p.shape, generator=gen))
        out[name] = _save(model, root / name, torch.float32)
    return out


@pytest.fixture(scope="module")
def tied_bf16_models(tmp_path_factory) -> dict[str, Path]:
    """Tied embeddings, stored in bfloat16: a bfloat16 job reads views of the file, like a float32 one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tied")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg)
    out = {"base": _save(base, root / "base", torch.bfloat16)}
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    out["a"] = _save(base, root / "a", torch.bfloat16)
    return out


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory maps of ``path`` (Linux /proc)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _fresh(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_resident_model_equals_a_fresh_load_and_owns_its_weights(wide_models, dtype):
    merger = ResidentMerger(str(wide_models["base"]), [str(wide_models[k]) for k in "abc"], dtype=dtype)
    got, ref = merger.model.state_dict(), _fresh(wide_models["base"], merger.dtype)
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # no weight is a view of the checkpoint file (the first merge would copy it page by page) ...
    if Path("/proc/self/maps").is_file():
        mapped = _file_mappings(wide_models["base"] / "model.safetensors")
        assert not [k for k, t in got.items() if any(lo <= t.data_ptr() < hi for lo, hi in mapped)]
    # ... nor shares memory with the base tensors that every merge reads
    base_ptrs = {t.data_ptr() for t in merger.base_state.values()}
    assert not [k for k, t in got.items() if t.data_ptr() in base_ptrs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_source_tensors_of_a_base_free_merge_stay_shared_views_of_the_file(wide_models, dtype):
    """``linear`` reads the experts themselves. Stored in the working dtype (float32 here) they stay read-only views
    of their memory-mapped files — page cache that workers on one node share and the kernel may reclaim — rather
    than a private copy per worker; converted (bfloat16) they are copies. Either way they equal the file's values
    and the merge never writes them."""
    experts = [str(wide_models[k]) for k in "abc"]
    merger = ResidentMerger(str(wide_models["base"]), experts, dtype=dtype)
    plan = MergePlan.model_validate({"merge_method": "linear", "dtype": dtype,
                                     "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts]})
    merger.apply(plan)
    merger.apply(plan)
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps")
    mapped = _file_mappings(Path(experts[0]) / "model.safetensors")
    for name in merger.tensor_names:
        t = merger.tensor(experts[0], name)
        in_file = any(lo <= t.data_ptr() < hi for lo, hi in mapped)
        assert in_file == (dtype == "float32"), name
        assert torch.equal(t, Checkpoint(experts[0]).get(name, merger.dtype)), name


def test_tied_bfloat16_checkpoint_keeps_its_tie(tied_bf16_models):
    merger = ResidentMerger(str(tied_bf16_models["base"]), [str(tied_bf16_models["a"])], dtype="bfloat16")
    model = merger.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = _fresh(tied_bf16_models["base"], torch.bfloat16)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
    if Path("/proc/self/maps").is_file():
        mapped = _file_mappings(tied_bf16_models["base"] / "model.safetensors")
        assert not any(lo <= p.data_ptr() < hi for p in model.parameters() for lo, hi in mapped)
    plan = MergePlan.model_validate({"merge_method": "task_arithmetic", "base_model": str(tied_bf16_models["base"]),
                                     "dtype": "bfloat16", "models": [{"model": str(tied_bf16_models["a"]),
                                                                      "parameters": {"weight": 0.5}}]})
    merger.apply(plan)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_task_vector_is_the_difference_and_leaves_the_file_alone(wide_models, dtype):
    base, a = Checkpoint(str(wide_models["base"])), Checkpoint(str(wide_models["a"]))
    assert base.dtypes["lm_head.weight"] == torch.float32
    # float32 reads are views of the file (never written); other dtypes are converted copies (τ takes them)
    assert a.read_copies("lm_head.weight", dtype) == (dtype != torch.float32)
    assert not a.read_copies("lm_head.weight") and a.read_copies("lm_head.weight", device="meta")
    state = {n: base.get(n, dtype) for n in base.shapes}
    for name in base.shapes:
        expected = a.get(name, dtype) - base.get(name, dtype)
        assert torch.equal(task_vector(base, a, name, dtype, base_state=state), expected), name
        assert torch.equal(task_vector(base, a, name, dtype), expected), name
    again = Checkpoint(str(wide_models["a"]))
    assert all(torch.equal(again.get(n), a.get(n)) for n in base.shapes)


def _plan(m: dict[str, Path], method: str, dtype: str, density: float) -> dict:
    return {"merge_method": method, "base_model": str(m["base"]), "dtype": dtype, "random_seed": 5,
            **({"parameters": {"epsilon": 0.1}} if method == "della" else {}),
            "models": [{"model": str(m[k]), "parameters": {"weight": w, "density": density}}
                       for k, w in zip("abc", (0.5, 0.3, 0.9), strict=True)]}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "della"])
def test_compact_caches_give_the_one_shot_merge_at_every_density(tmp_path, wide_models, method, dtype):
    import yaml
    from safetensors.torch import load_file

    merger = ResidentMerger(str(wide_models["base"]), [str(wide_models[k]) for k in "abc"], dtype=dtype)
    for i, d in enumerate((0.7, 0.2, 0.45)):  # warm caches reused at new densities
        plan = _plan(wide_models, method, dtype, d)
        got = {k: v.clone() for k, v in merger.apply(MergePlan.model_validate(plan)).state_dict().items()}
        cfg = tmp_path / f"{i}.yml"
        cfg.write_text(yaml.safe_dump(plan))
        ref = load_file(str(merge_config(cfg, tmp_path / f"out{i}") / "model.safetensors"))
        for k, v in ref.items():
            assert torch.equal(got[k], v), (d, k)
    if method == "della":
        assert merger._ranks and all(r.dtype == torch.uint16 for r in merger._ranks.values())
    else:
        orders = merger._orders.values()
        keyed = [o for o in orders if o.sorted is None]
        assert keyed, "the fixture's matrices take the counting path"
        # 6 bytes a key, never more than a float32 sort of τ would take
        assert all(o.nbytes == 6 * o.keys.numel() <= min(6 << 15, 4 * o.numel) for o in keyed)
        assert all(o.nbytes <= 4 * max(o.numel, sp.SMALL) for o in orders)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_build_no_magnitude_order(wide_models, method, dtype):
    """A magnitude order costs a counting pass over τ and its memory: only magnitude masks may build one."""
    merger = ResidentMerger(str(wide_models["base"]), [str(wide_models[k]) for k in "abc"], dtype=dtype)
    merger.apply(MergePlan.model_validate(_plan(wide_models, method, dtype, 0.5)))
    assert merger._orders == {}
    merger.apply(MergePlan.model_validate(_plan(wide_models, "ties", dtype, 0.5)))
    assert merger._orders  # the check above can fail: a magnitude mask fills it
