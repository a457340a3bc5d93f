"""Write and read a twin-merged model: a HF shared model, one PEFT LoRA adapter per expert, and the router.

Layout of an export directory (written to a temporary sibling, then renamed into place)::

    config.json, model.safetensors, tokenizer files   the shared model θ* (``from_pretrained`` loads it alone)
    adapters/<name>/adapter_config.json               expert <name>'s exclusive part as a LoRA adapter:
    adapters/<name>/adapter_model.safetensors           r, lora_alpha = r (scale 1), target_modules = the
                                                        covered modules, PEFT's key names
    router.safetensors, router.json                   the router's weights and shape/window
    corrections.safetensors                           per-task block-output corrections (scale, shift [T, L, H]),
                                                        when the model is variance-corrected
    twin.json                                         format, experts (order = router outputs), rank, meta

``PeftModel.from_pretrained(shared, dir / "adapters" / name)`` gives expert <name>'s twin θ* + B·A; ``load_twin``
rebuilds the routed model. Only safetensors are read, and no remote code runs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergesearch.errors import ConfigError, ModelError
from mergesearch.twin.correct import Corrections
from mergesearch.twin.factors import TwinFactors
from mergesearch.twin.routed import RoutedModel
from mergesearch.twin.router import Router

FORMAT = "mergesearch-twin"
VERSION = 1
ADAPTERS = "adapters"
#: per-task block-output corrections (variance-collapse correction), when exported
CORRECTIONS = "corrections.safetensors"


def _peft_key(module: str, part: str) -> str:
    # PEFT saves adapter weights under the PeftModel's module path with the adapter name removed:
    # base_model.model.<module>.lora_A.weight
    return f"base_model.model.{module}.{part}.weight"


def export_twin(out_dir: str | Path, shared_model: nn.Module, tokenizer_dir: str | Path, factors: TwinFactors,
                router: Router | None, meta: Mapping[str, Any] | None = None, *, overwrite: bool = False,
                corrections: Corrections | None = None) -> Path:
    """Write a twin-merged model directory atomically.

    Args:
        out_dir: destination; refused if non-empty unless ``overwrite``.
        shared_model: the shared HF model θ* (a routed model's ``shared``; its hooks do not affect saving).
        tokenizer_dir: directory whose tokenizer files are copied (e.g. ``merger.tokenizer_path``).
        factors: the experts' low-rank parts (rank ≥ 1).
        router: the trained router (``None``: written without one; load then needs oracle α).
        meta: JSON-ready extra information (e.g. the shared plan, scores), stored under ``meta`` in twin.json.
        overwrite: replace an existing non-empty directory.

    Returns:
        ``out_dir``.

    Raises:
        ConfigError: rank 0 (nothing to export as adapters; export the shared model as a plain merge), or a
            non-empty ``out_dir`` without ``overwrite``. ModelError: ``tokenizer_dir`` is not a directory.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from mergesearch.merging.run import _commit, _prepare_out, copy_tokenizer

    if factors.rank < 1 and corrections is None:
        raise ConfigError("twin rank 0 has no exclusive parts to export as adapters; export the shared merge")
    out_dir, src = Path(out_dir), Path(tokenizer_dir)
    if not src.is_dir():
        raise ModelError(f"tokenizer source {src} is not a directory")
    tmp = _prepare_out(out_dir, overwrite)
    try:
        shared_model.save_pretrained(tmp)  # type: ignore[operator]
        copy_tokenizer(src, tmp)
        for t, name in enumerate(factors.names if factors.rank > 0 else ()):
            path = tmp / ADAPTERS / name
            LoraConfig(r=factors.rank, lora_alpha=factors.rank, target_modules=factors.modules, lora_dropout=0.0,
                       bias="none", task_type="CAUSAL_LM").save_pretrained(str(path))
            tensors = {}
            for m in factors.modules:
                tensors[_peft_key(m, "lora_A")] = factors.A[m][t].detach().cpu().contiguous()
                tensors[_peft_key(m, "lora_B")] = factors.B[m][t].detach().cpu().contiguous()
            save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        if router is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in router.state_dict().items()}
            save_file(state, str(tmp / "router.safetensors"), metadata={"format": "pt"})
            (tmp / "router.json").write_text(json.dumps(router.config_dict(), indent=2) + "\n")
        if corrections is not None:
            save_file({"scale": corrections.scale.detach().cpu().contiguous(),
                       "shift": corrections.shift.detach().cpu().contiguous()}, str(tmp / CORRECTIONS),
                      metadata={"format": "pt"})
        info = {"format": FORMAT, "version": VERSION, "experts": list(factors.experts), "names": list(factors.names),
                "rank": factors.rank, "router": router is not None, "meta": dict(meta or {}),
                "corrections": None if corrections is None else list(corrections.layers)}
        (tmp / "twin.json").write_text(json.dumps(info, indent=2) + "\n")
        return _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None


def _load_adapter(path: Path) -> tuple[int, float, list[str], dict[str, torch.Tensor]]:
    """(r, lora_alpha / r, target modules, tensors) of one adapter directory we wrote."""
    from safetensors.torch import load_file

    cfg = _read_json(path / "adapter_config.json")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{weights}: missing")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise ModelError(f"{path / 'adapter_config.json'}: target_modules must be a list of module names")
    r = int(cfg["r"])
    return r, float(cfg.get("lora_alpha", r)) / r, targets, load_file(str(weights))


def load_twin(directory: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None) -> RoutedModel:
    """Rebuild the routed model an :func:`export_twin` directory holds.

    Args:
        directory: the export directory.
        device: where the model goes.
        dtype: the shared model's dtype (default: as saved).

    Returns:
        The routed model (eval mode), with its router if one was exported; its tokenizer is in ``directory``.

    Raises:
        ModelError: a missing or malformed file.
    """
    from transformers import AutoModelForCausalLM

    root = Path(directory)
    info = _read_json(root / "twin.json")
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ModelError(f"{root / 'twin.json'}: not a {FORMAT} v{VERSION} export")
    try:
        shared = AutoModelForCausalLM.from_pretrained(root, dtype=dtype or "auto", use_safetensors=True,
                                                      trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{root}: cannot load the shared model ({exc})") from None
    shared = shared.to(device).eval().requires_grad_(False)
    names, rank = list(info["names"]), int(info["rank"])
    A: dict[str, list[torch.Tensor]] = {}
    B: dict[str, list[torch.Tensor]] = {}
    for name in names if rank > 0 else ():
        r, scale, targets, tensors = _load_adapter(root / ADAPTERS / name)
        if r != rank:
            raise ModelError(f"{root / ADAPTERS / name}: rank {r}, twin.json says {rank}")
        for m in targets:
            try:
                a, b = tensors[_peft_key(m, "lora_A")], tensors[_peft_key(m, "lora_B")]
            except KeyError:
                raise ModelError(f"{root / ADAPTERS / name}: no LoRA weights for module {m!r}") from None
            A.setdefault(m, []).append(a.float().to(device))
            B.setdefault(m, []).append((b.float() * scale).to(device))
    incomplete = [m for m, v in A.items() if len(v) != len(names)]
    if incomplete:
        raise ModelError(f"{root / ADAPTERS}: module {incomplete[0]!r} is not covered by every expert's adapter")
    factors = TwinFactors(tuple(info["experts"]), tuple(names), rank,
                          {m: torch.stack(v) for m, v in A.items()}, {m: torch.stack(v) for m, v in B.items()})
    router = None
    if info.get("router"):
        from safetensors.torch import load_file

        router = Router.from_config(_read_json(root / "router.json"))
        weights = root / "router.safetensors"
        if not weights.is_file():
            raise ModelError(f"{weights}: missing")
        try:
            router.load_state_dict(load_file(str(weights)))
        except RuntimeError as exc:
            raise ModelError(f"{weights}: does not match router.json ({exc})") from None
        router = router.to(device).eval().requires_grad_(False)
    corrections = None
    if info.get("corrections"):
        from safetensors.torch import load_file

        path = root / CORRECTIONS
        if not path.is_file():
            raise ModelError(f"{path}: missing")
        t = load_file(str(path))
        corrections = Corrections(tuple(info["corrections"]), t["scale"], t["shift"])
    return RoutedModel(shared, factors, router, corrections=corrections).eval()
