"""Aligned experts as checkpoints: each expert permuted to line up with the base, written once and reused.

A study with ``space.align: [weights]`` (or ``activations``) merges experts whose MLP units and attention head
groups were permuted to match the base's (:mod:`mergesearch.merging.align`). The aligned expert computes the same
function as the original, so it is written as an ordinary Hugging Face directory (safetensors, config, tokenizer)
and the merge engine, the plans, exports and ``mergekit-yaml`` use it like any other model: nothing downstream
knows about alignment. The directory lives in a cache (``$MERGESEARCH_CACHE``, default ``~/.cache/mergesearch``)
under a name derived from the mode, the two checkpoints' files (path, size, mtime) and, for activation matching,
the prompts — so it is computed once per study (and per node of a cluster, by whichever process needs it first)
and recomputed when an input changes. Writes are atomic (temp directory + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from mergesearch.errors import ConfigError, DataError
from mergesearch.models import Checkpoint

if TYPE_CHECKING:
    from mergesearch.config import JobConfig

Mode = Literal["weights", "activations"]
#: prompts per forward pass of activation matching
_BATCH = 16


def cache_root() -> Path:
    """Where aligned experts are written."""
    return Path(os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch") / "aligned"


def _files_digest(ref: str, h: hashlib._Hash) -> None:
    path = Path(ref)
    h.update(str(path.resolve() if path.exists() else ref).encode())
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())


def aligned_path(base: str, expert: str, mode: Mode, prompts: Sequence[str] = ()) -> Path:
    """The cache directory of ``expert`` aligned to ``base`` by ``mode`` (whether or not it exists yet)."""
    h = hashlib.sha256(mode.encode())
    for ref in (base, expert):
        _files_digest(ref, h)
    if mode == "activations":
        h.update("\0".join(prompts).encode())
    return cache_root() / f"{Path(expert).name or 'expert'}-{mode}-{h.hexdigest()[:16]}"


def ensure_aligned(base: str, expert: str, mode: Mode, prompts: Sequence[str] = (), *,
                   allow_pickle: bool = False) -> Path:
    """``expert`` permuted to line up with ``base``, written to its cache directory unless already there.

    Args:
        base, expert: checkpoints (local directories or hub ids, as the job names them).
        mode: ``weights`` (Git Re-Basin weight matching) or ``activations`` (correlation of activations on
            ``prompts``).
        prompts: unlabelled prompts for ``activations``.

    Returns:
        The aligned expert's directory.

    Raises:
        ModelError: models of different widths or an unsupported architecture (one line naming the field).
        DataError: activation matching without prompts.
    """
    from mergesearch.merging import align

    out = aligned_path(base, expert, mode, prompts)
    if (out / "config.json").is_file():
        return out
    base_ck = Checkpoint(base, allow_pickle=allow_pickle)
    expert_ck = Checkpoint(expert, allow_pickle=allow_pickle)
    align.check_alignable(base_ck.config, expert_ck.config)
    if mode == "weights":
        perm = align.weight_matching(_LazyState(base_ck), _LazyState(expert_ck), base_ck.config)
    else:
        perm = _activation_perm(base_ck, expert_ck, prompts)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        tensors = {n: align.permute_tensor(n, expert_ck.get(n), perm).contiguous() for n in expert_ck.shapes}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(expert_ck.config, indent=2))
        from mergesearch.merging.run import copy_tokenizer

        copy_tokenizer(expert_ck.path, tmp)
        (tmp / "aligned.json").write_text(json.dumps({"base": base, "expert": expert, "mode": mode}, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process wrote it first: theirs is the same
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _LazyState:
    """A checkpoint as a read-only ``name -> tensor`` mapping, read one tensor at a time."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.ck.shapes:
            raise KeyError(name)
        return self.ck.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.ck.shapes

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self[name] if name in self.ck.shapes else default

    def keys(self):
        return self.ck.shapes.keys()


def _activation_perm(base_ck: Checkpoint, expert_ck: Checkpoint, prompts: Sequence[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergesearch.merging import align

    if not prompts:
        raise DataError("space.align: activation matching needs unlabelled prompts (space.align_data, or task "
                        "objectives with data files)")
    tok = AutoTokenizer.from_pretrained(base_ck.path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batches = [dict(tok(list(prompts[i:i + _BATCH]), return_tensors="pt", padding=True))
               for i in range(0, len(prompts), _BATCH)]
    models = [AutoModelForCausalLM.from_pretrained(ck.path, dtype=torch.float32) for ck in (base_ck, expert_ck)]
    return align.activation_matching(models[0], models[1], batches, models[0].config)


def read_prompts(path: Path) -> list[str]:
    """Unlabelled prompts: a ``.txt`` file (one per line) or JSONL with ``prompt`` (or ``text``) fields.

    Raises:
        DataError: a missing file or a line without a prompt (naming file and line).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            out.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from None
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}:{i}: needs a 'prompt' or 'text' string")
        out.append(text)
    return out


def align_prompts(align_data: Path | None, objective_data: Sequence[Path]) -> list[str]:
    """The prompts activation matching runs on: ``space.align_data``, else the task objectives' search prompts."""
    if align_data is not None:
        return read_prompts(align_data)
    out: list[str] = []
    for path in objective_data:
        if path.suffix == ".jsonl":
            out.extend(read_prompts(path))
    if not out:
        raise ConfigError("space.align: activations needs prompts: set space.align_data or give task objectives "
                          "with JSONL data")
    return out


def expert_sets(config: JobConfig, *, ensure: bool = True) -> dict[str, list[str]]:
    """The experts a job's plans may name, per ``space.align`` choice (``none``: the job's own models).

    Args:
        config: the job.
        ensure: write the aligned experts that are missing (else only their paths are computed).
    """
    sets: dict[str, list[str]] = {}
    prompts: list[str] = []
    if "activations" in config.space.align:
        prompts = align_prompts(config.space.align_data, [o.data for o in config.objectives if o.data is not None])
    for mode in config.space.align:
        if mode == "none":
            sets[mode] = list(config.models)
            continue
        paths = [ensure_aligned(config.base_model, m, mode, prompts, allow_pickle=config.allow_pickle) if ensure
                 else aligned_path(config.base_model, m, mode, prompts) for m in config.models]
        sets[mode] = [str(p) for p in paths]
    return sets


def merger_models(config: JobConfig) -> list[str]:
    """Every expert a resident merger of this job loads, written if missing: the job's own models (the reference
    rows — each expert, the uniform average — are always of those) and the aligned ones its space may name."""
    sets = expert_sets(config) if config.space.align != ["none"] else {}
    return list(dict.fromkeys([*config.models, *(m for models in sets.values() for m in models)]))
