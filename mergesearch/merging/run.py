"""``mergesearch merge``: run a mergekit-style config and write a Hugging Face model directory atomically."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergesearch.errors import ConfigError, ModelError, NonFiniteError
from mergesearch.merging.engine import run_job
from mergesearch.merging.plan import MergePlan, load_plan, mergekit_equivalent, plan_to_yaml
from mergesearch.merging.resolve import Resolved, plan_models, resolve
from mergesearch.models import Checkpoint, all_finite, check_compatible, num_layers_of, to_dtype

SHARD_BYTES = 5 * 2**30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "spiece.model")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def open_models(plan: MergePlan, *, allow_pickle: bool = False,
                base_dir: Path | None = None) -> tuple[str, dict[str, Checkpoint]]:
    """Open (headers only) every checkpoint the plan names and check them against the base.

    Returns:
        (base model string, model string -> Checkpoint); the base is ``base_model`` or the first model.
    """
    names = plan_models(plan)
    if not names:
        raise ConfigError("the merge plan names no models")
    cks = {n: Checkpoint(n, allow_pickle=allow_pickle, base_dir=base_dir) for n in names}
    base = names[0]
    for n in names[1:]:
        check_compatible(cks[base], cks[n])
    return base, cks


def output_config(base_config: Mapping[str, Any], resolved: Resolved, models: Mapping[str, Checkpoint],
                  dtype: torch.dtype | None) -> dict[str, Any]:
    """The base's config with the output's layer count, per-layer lists remapped, and the output dtype."""
    cfg = json.loads(json.dumps(base_config))
    target = cfg.get("text_config", cfg)
    n_out = len(resolved.layer_map)
    n_base = num_layers_of(cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(target.get(key), int):
            target[key] = n_out
    for key, value in list(target.items()):  # e.g. layer_types: one entry per layer, follows its source layer
        if isinstance(value, list) and len(value) == n_base and n_base > 0 and key != "architectures":
            per_model = {m: models[m].config.get("text_config", models[m].config).get(key, value) for m, _ in
                         resolved.layer_map}
            target[key] = [per_model[m][i] if i < len(per_model[m]) else value[-1] for m, i in resolved.layer_map]
    if dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = _DTYPE_NAMES.get(dtype, str(dtype))
    return cfg


def _prepare_out(out_dir: Path, overwrite: bool) -> Path:
    """A fresh temp sibling of ``out_dir`` to write into; refuses a non-empty out_dir without overwrite."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {out_dir} exists and is not empty (use --overwrite)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(tmp: Path, out_dir: Path) -> Path:
    """Replace ``out_dir`` by ``tmp`` with renames, so a reader never sees a half-written directory."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return out_dir


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy tokenizer files and generation_config.json from a model directory (those that exist)."""
    for name in (*_TOKENIZER_FILES, "generation_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _tokenizer_dir(plan: MergePlan, base: str, models: Mapping[str, Checkpoint], base_dir: Path | None) -> Path:
    src = plan.tokenizer_source
    if src is None or src == "base":
        return models[base].path
    if src == "union":
        raise ConfigError("tokenizer_source 'union' is not supported; name a model or 'base'")
    from mergesearch.models import resolve_model

    return models[src].path if src in models else resolve_model(src, base_dir=base_dir)


def write_recipe(plan: MergePlan, dst: Path) -> None:
    """``recipe.yaml`` (everything, with the seed) and ``mergekit_config.yml`` (what mergekit-yaml replays with the
    same semantics), or, where mergekit cannot, a note saying why at the top of ``recipe.yaml``."""
    equivalent, why = mergekit_equivalent(plan)
    note = ""
    if equivalent is not None:
        (dst / "mergekit_config.yml").write_text(plan_to_yaml(equivalent, strict_mergekit=True))
    else:
        note = f"# no mergekit_config.yml: {why}; replay with `mergesearch merge recipe.yaml OUT`\n"
    (dst / "recipe.yaml").write_text(note + plan_to_yaml(plan))


def write_safetensors(tensors: Mapping[str, torch.Tensor], dst: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """Save tensors as ``model.safetensors`` or as shards with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def merge_plan_tensors(plan: MergePlan, base: str, models: Mapping[str, Checkpoint], *,
                       device: str = "cpu") -> tuple[Resolved, dict[str, torch.Tensor]]:
    """Resolve the plan and compute every output tensor (in the plan's out_dtype, else dtype, else stored)."""
    resolved = resolve(plan, models, base)
    work = to_dtype(plan.dtype)
    out_dtype = to_dtype(plan.out_dtype, work)
    fetch: Callable[[str, str], torch.Tensor] = lambda m, n: models[m].get(n, work, device)  # noqa: E731
    out = {}
    for job in resolved.jobs:
        t = run_job(job, fetch, seed=plan.random_seed)
        if out_dtype is not None and t.is_floating_point() and t.dtype != out_dtype:
            t = t.to(out_dtype)
            if not all_finite(t):  # finite in the working dtype, out of the narrower out_dtype's range
                raise NonFiniteError(f"merged tensor {job.name!r} (method {job.method}) overflows out_dtype "
                                     f"{plan.out_dtype}: merge with out_dtype {plan.dtype or 'float32'}")
        out[job.name] = t.cpu()
    return resolved, out


def merge_config(config_path: str | Path, out_dir: str | Path, *, allow_pickle: bool = False,
                 trust_remote_code: bool = False, overwrite: bool = False, device: str = "cpu") -> Path:
    """Run a mergekit-style YAML config and write a Hugging Face model directory.

    Args:
        config_path: the YAML config (``models`` or ``slices``, ``merge_method``, ``base_model``, ...).
        out_dir: where to write; refused if it exists non-empty unless ``overwrite``.
        allow_pickle: allow ``.bin`` checkpoints (read with ``weights_only=True``).
        trust_remote_code: accepted for custom architectures; tensors are merged by name either way, and no
            model code is run here.
        device: where tensors are merged.

    Returns:
        The written directory: config.json, safetensors, tokenizer files, mergekit_config.yml, recipe.yaml.
    """
    del trust_remote_code  # no model code is loaded by a tensor-level merge
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"output directory {out_dir} exists and is not empty (use --overwrite)")
    plan = load_plan(config_path)
    base_dir = Path(config_path).resolve().parent
    base, models = open_models(plan, allow_pickle=allow_pickle, base_dir=base_dir)
    resolved, tensors = merge_plan_tensors(plan, base, models, device=device)
    tok_dir = _tokenizer_dir(plan, base, models, base_dir)
    out_dtype = to_dtype(plan.out_dtype, to_dtype(plan.dtype))
    tmp = _prepare_out(out_dir, overwrite)
    try:
        write_safetensors(tensors, tmp)
        cfg = output_config(models[base].config, resolved, models, out_dtype)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer(tok_dir, tmp)
        write_recipe(plan, tmp)
        return _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_dir(model: torch.nn.Module, out_dir: str | Path, *, tokenizer_source: str | Path,
                   recipe: MergePlan, overwrite: bool = False, extra_files: Mapping[str, str] | None = None) -> Path:
    """Save a resident (merged) model with its tokenizer and recipe as a HF directory, atomically.

    Args:
        model: a ``PreTrainedModel`` (e.g. ``ResidentMerger.apply``'s result); its config is saved as is.
        out_dir: destination; refused if non-empty unless ``overwrite``.
        tokenizer_source: directory holding the tokenizer files to copy (e.g. ``merger.tokenizer_path``).
        recipe: the plan that produced the weights (written as mergekit_config.yml and recipe.yaml).
        extra_files: more text files to write into the directory (name -> content), e.g. scores.json.
    """
    out_dir = Path(out_dir)
    src = Path(tokenizer_source)
    if not src.is_dir():
        raise ModelError(f"tokenizer source {src} is not a directory")
    tmp = _prepare_out(out_dir, overwrite)
    try:
        model.save_pretrained(tmp)  # type: ignore[operator]
        copy_tokenizer(src, tmp)
        write_recipe(recipe, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        return _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
