"""Checkpoint I/O: sharded safetensors, pickle opt-in, compatibility and NaN checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesearch.errors import ModelError
from mergesearch.merging.run import write_safetensors
from mergesearch.models import Checkpoint, check_compatible, layer_key, resolve_model


def test_sharded_checkpoint_reads_same_tensors(tmp_path, tiny_models):
    sd = load_file(str(tiny_models["a"] / "model.safetensors"))
    d = tmp_path / "sharded"
    shutil.copytree(tiny_models["a"], d)
    (d / "model.safetensors").unlink()
    write_safetensors(sd, d, shard_bytes=20_000)
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    ck = Checkpoint(str(d))
    assert set(ck.shapes) == set(sd) and ck.num_layers == 2
    assert all(torch.equal(ck.get(k), v) for k, v in sd.items())


def test_pickle_needs_opt_in(tmp_path, tiny_models):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_models["a"], d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="allow-pickle"):
        Checkpoint(str(d))
    ck = Checkpoint(str(d), allow_pickle=True)
    assert torch.equal(ck.get("lm_head.weight"), sd["lm_head.weight"])


def test_missing_dir_names_path():
    with pytest.raises(ModelError, match="/no/such/model"):
        resolve_model("/no/such/model")


def test_hub_id_offline_is_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not-a-user/not-a-model"):
        resolve_model("not-a-user/not-a-model")


def test_mismatched_shapes_name_model_and_tensor(tmp_path, tiny_models):
    from tests.conftest import make_tiny_llama

    other = make_tiny_llama(tmp_path / "wide", seed=5, hidden=48)
    with pytest.raises(ModelError, match=r"model '.*wide'.*tensor 'lm_head.weight'"):
        check_compatible(Checkpoint(str(tiny_models["base"])), Checkpoint(str(other)))


def test_model_type_mismatch(tmp_path, tiny_models):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_models["a"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelError, match="model_type 'gpt2'"):
        check_compatible(Checkpoint(str(tiny_models["base"])), Checkpoint(str(d)))


def test_nan_tensor_is_named(tmp_path, tiny_models):
    d = tmp_path / "nan"
    shutil.copytree(tiny_models["a"], d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"\'model\.norm\.weight\' contains NaN"):
        Checkpoint(str(d)).get("model.norm.weight")


def test_layer_key():
    assert layer_key("model.layers.12.mlp.up_proj.weight") == ("model.layers.{}.mlp.up_proj.weight", 12)
    assert layer_key("transformer.h.3.attn.c_attn.weight") == ("transformer.h.{}.attn.c_attn.weight", 3)
    assert layer_key("model.norm.weight") == ("model.norm.weight", None)
    assert Path(resolve_model(".")).is_dir()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_all_finite_sees_nan_and_inf_and_never_overflows(dtype):
    from mergesearch.models import all_finite

    big = torch.finfo(dtype).max
    t = torch.full((1000,), big, dtype=dtype)  # finite, yet its sum overflows to inf
    assert all_finite(t) and all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[567] = bad
        assert not all_finite(u), bad


def test_checkpoint_dtypes_and_which_reads_are_copies(tmp_path, tiny_models):
    ck = Checkpoint(str(tiny_models["a"]))
    assert set(ck.dtypes) == set(ck.shapes) and set(ck.dtypes.values()) == {torch.float32}
    name = "lm_head.weight"
    # same dtype on the CPU: a view of the memory-mapped file (must never be written); else a copy of our own
    assert not ck.read_copies(name, torch.float32) and not ck.read_copies(name)
    assert ck.read_copies(name, torch.bfloat16) and ck.read_copies(name, torch.float32, device="meta")
    d = tmp_path / "half"
    shutil.copytree(tiny_models["a"], d)
    sd = load_file(str(d / "model.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    half = Checkpoint(str(d))
    assert half.dtypes[name] == torch.float16 and not half.read_copies(name, torch.float16)
    assert half.read_copies(name, torch.float32)
