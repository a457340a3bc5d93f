"""Scoring a saved model directory (``mergesearch eval``): load it, read the base lazily, evaluate."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mergesearch.errors import ModelError
from mergesearch.objectives.base import ObjectiveContext, Split
from mergesearch.objectives.registry import build_objectives, evaluate

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class SafetensorsState(Mapping[str, torch.Tensor]):
    """A read-only, lazy state dict over a model's ``*.safetensors`` files: a tensor is read when asked for."""

    def __init__(self, model: str | Path) -> None:
        from safetensors import safe_open

        folder = _local_dir(model)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{folder}: no *.safetensors files")
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open has no iter)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _local_dir(model: str | Path) -> Path:
    """A local folder, or a hub id's snapshot (weights, configs and tokenizer files)."""
    path = Path(model)
    if path.is_dir():
        return path
    if path.is_absolute() or str(model).startswith(".") or path.exists():
        raise ModelError(f"{model}: model folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt"]))
    except Exception as e:
        raise ModelError(f"{model}: not a local folder and not downloadable ({type(e).__name__})") from None


def evaluate_model_dir(
    model_dir: str,
    configs: Sequence[ObjectiveConfig],
    *,
    split: Split = "search",
    base_model: str | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Score a saved Hugging Face model on objectives (what ``mergesearch eval`` prints).

    Args:
        model_dir: a folder (or hub id) with config, safetensors weights and tokenizer.
        configs: the objectives (e.g. a job config's ``objectives``).
        split: ``search`` uses each objective's ``data`` file, ``test`` its ``test`` file.
        base_model: the base model, for ``l1_from_base`` / ``nonzero_delta``.
        device: where to run.

    Returns:
        ``{objective name: value}``.

    Raises:
        ModelError: the model cannot be loaded. ConfigError / DataError: bad objectives or data.
    """
    from transformers import AutoTokenizer

    from mergesearch.candidates import load_model

    folder = _local_dir(model_dir)
    base = SafetensorsState(base_model) if base_model is not None else None
    objectives = build_objectives(configs, ObjectiveContext(base_state=base, device=device, split=split))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{model_dir}: cannot load model ({reason})") from None
    model = load_model(folder, device=device, dtype=torch.float32)  # any candidate family's export
    return evaluate(objectives, model, tokenizer)
