"""Checkpoint I/O: find a model directory, read its tensors lazily, check sources against the base.

Tensors are read from safetensors files (one file or shards listed in ``model.safetensors.index.json``) through
memory maps, so opening a checkpoint costs only its headers. Pickle ``.bin`` files can run code when unpickled:
they are read only with an explicit opt-in, and then with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from mergesearch.errors import ModelError

#: ``<prefix>.<layer index>.<suffix>`` for the decoder stacks of common architectures (Llama, GPT-2, NeoX, OPT).
LAYER_RE = re.compile(r"^(.*?\b(?:layers|h|blocks)\.)(\d+)(\..+)$")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
#: safetensors' dtype names of the floating-point dtypes (others map to None in ``Checkpoint.dtypes``)
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def to_dtype(name: str | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """Map a dtype name from a config (``float32``, ``bfloat16``, ...) to a torch dtype."""
    if name is None:
        return default
    if name not in _DTYPES:
        from mergesearch.errors import ConfigError

        raise ConfigError(f"unknown dtype {name!r} (known: {', '.join(sorted(_DTYPES))})")
    return _DTYPES[name]


def resolve_model(ref: str | Path, *, base_dir: Path | None = None) -> Path:
    """Return the local directory of a model given as a path or a Hugging Face hub id.

    Args:
        ref: a directory, or ``org/name`` on the hub (downloaded with ``snapshot_download``, which uses the cache).
        base_dir: a second place to look for relative paths (e.g. the directory of the config file).

    Raises:
        ModelError: neither a directory nor a downloadable hub id; the message names ``ref``.
    """
    path = Path(ref).expanduser()
    candidates = [path] + ([base_dir / path] if base_dir is not None and not path.is_absolute() else [])
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(ref)) is not None and not path.exists()
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(str(ref), allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt",
                                                                    "*.model", "*.jinja"]))
        except Exception as e:  # offline, unknown repo, auth: all mean "cannot get this model"
            looked = ", ".join(str(c.resolve()) for c in candidates)
            raise ModelError(f"model {ref!r}: no local folder ({looked}), and the hub refused it: "
                             f"{hub_reply(e)}") from None
    raise ModelError(f"model {ref!r}: directory {path.resolve()} does not exist")


def hub_reply(exc: BaseException) -> str:
    """One line for a hub or network failure: the error type and the host's own first line (status, reason),
    or, when offline mode refused it, that."""
    import os

    text = (str(exc).strip().splitlines() or [""])[0]
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and "offline" not in text.lower():
        text = f"HF_HUB_OFFLINE is set; {text}" if text else "HF_HUB_OFFLINE is set"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def num_layers_of(config: dict[str, Any]) -> int:
    """Number of decoder layers a HF config dict declares (0 if none)."""
    cfg = config.get("text_config", config)
    for key in _LAYER_KEYS:
        if isinstance(cfg.get(key), int):
            return int(cfg[key])
    return 0


class Checkpoint:
    """A model directory whose tensors are read on demand (memory-mapped safetensors).

    Attributes:
        ref: the string the user gave (path or hub id); used in messages and as the model's key in plans.
        path: the resolved local directory.
        config: ``config.json`` as a dict.
        shapes: tensor name -> shape, in file order.
        dtypes: tensor name -> the dtype stored in the file (None for non-floating dtypes of safetensors files).
        integer: names of the tensors stored in an integer or bool dtype (buffers such as position ids or
            masks): state, not weights, so plans copy them from the base and never merge them.
        num_layers: decoder layers per the config.
    """

    def __init__(self, ref: str, *, allow_pickle: bool = False, base_dir: Path | None = None):
        self.ref = ref
        self.path = resolve_model(ref, base_dir=base_dir)
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ModelError(f"model {ref!r}: no config.json in {self.path}")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"model {ref!r}: {cfg_file} is not valid JSON ({e})") from None
        self.num_layers = num_layers_of(self.config)
        self._files: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype | None] = {}
        self.integer: set[str] = set()
        if not self._open_safetensors():
            self._open_pickle(allow_pickle)
        if not self.shapes:
            raise ModelError(f"model {ref!r}: no tensors found in {self.path}")

    def _open_safetensors(self) -> bool:
        from safetensors import safe_open

        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
        for f in files:
            if not f.is_file():
                raise ModelError(f"model {self.ref!r}: shard {f.name} listed in the index is missing")
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                        self._files[name] = f
                        piece = st.get_slice(name)
                        self.shapes[name] = tuple(piece.get_shape())
                        self.dtypes[name] = _ST_DTYPES.get(piece.get_dtype())
                        if piece.get_dtype() == "BOOL" or piece.get_dtype()[0] in "IU":  # I8..I64, U8..U64
                            self.integer.add(name)
            except Exception as e:  # SafetensorError (truncated or corrupt header) or OSError
                reason = (str(e).splitlines() or [type(e).__name__])[0]
                raise ModelError(f"model {self.ref!r}: cannot read {f} ({reason})") from None
        return bool(files)

    def _open_pickle(self, allow_pickle: bool) -> None:
        bins = sorted(self.path.glob("*.bin"))
        if not bins:
            return
        if not allow_pickle:
            raise ModelError(f"model {self.ref!r} has only pickle .bin weights ({bins[0].name}); "
                             "pass --allow-pickle (allow_pickle=True) to load them")
        self._pickled = {}
        for f in bins:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ModelError(f"model {self.ref!r}: cannot read {f.name} ({e})") from None
            self._pickled.update(state)
        self.shapes = {k: tuple(v.shape) for k, v in self._pickled.items()}
        self.dtypes = {k: v.dtype for k, v in self._pickled.items()}
        self.integer = {k for k, v in self._pickled.items() if not v.is_floating_point()}

    def get(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.Tensor:
        """One tensor, cast to ``dtype`` (if floating); raises ModelError if absent or not finite.

        A model with tied embeddings may store no ``lm_head.weight``: its input embedding is read instead, as
        mergekit does (``check_compatible`` lets such a model meet an untied base).
        """
        name = self._stored(name)
        if name not in self.shapes:
            raise ModelError(f"model {self.ref!r}: has no tensor {name!r}")
        if self._pickled is not None:
            t = self._pickled[name]
        else:
            from safetensors import safe_open

            with safe_open(str(self._files[name]), framework="pt", device=device) as st:
                t = st.get_tensor(name)
        if t.is_floating_point() and not all_finite(t):
            raise ModelError(f"model {self.ref!r}: tensor {name!r} contains NaN or Inf")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def _stored(self, name: str) -> str:
        """The stored tensor holding ``name``: itself, or a tied model's input embedding for its lm_head."""
        if name in self.shapes or not self.tied_embeddings or not name.endswith("lm_head.weight"):
            return name
        return next((n for n in self.shapes if n.endswith(("embed_tokens.weight", "wte.weight"))
                     and layer_key(n)[1] is None), name)

    def read_copies(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> bool:
        """Whether ``get(name, dtype, device)`` returns a tensor of its own (converted to another dtype or moved
        off the CPU) rather than a view of the memory-mapped file, which must never be written."""
        stored = self.dtypes.get(self._stored(name))
        return torch.device(device).type != "cpu" or (stored is not None and dtype is not None and stored != dtype)

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or ±inf, in one pass that allocates nothing tensor-sized.

    min and max propagate NaN and are ±inf exactly when an entry is; unlike a sum they cannot overflow, and
    unlike ``sum(dtype=float64)`` or ``isfinite(t)`` they make no float64 copy or bool mask of ``t``.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def layer_key(name: str) -> tuple[str, int | None]:
    """``model.layers.3.mlp.w`` -> (``model.layers.{}.mlp.w``, 3); non-layer names -> (name, None)."""
    m = LAYER_RE.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}{{}}{m.group(3)}", int(m.group(2))


def check_compatible(base: Checkpoint, other: Checkpoint) -> None:
    """Raise ModelError unless ``other`` has the base's architecture and tensor shapes.

    Layer counts may differ (frankenmerges stack layers of models of different depth); every tensor kind
    (name with the layer index removed) must exist in both with the same shape.
    """
    if base.config.get("model_type") != other.config.get("model_type"):
        raise ModelError(f"model {other.ref!r}: model_type {other.config.get('model_type')!r} differs from "
                         f"base {base.ref!r} ({base.config.get('model_type')!r})")

    def kinds(ck: Checkpoint) -> dict[str, tuple[str, tuple[int, ...]]]:
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, shape in ck.shapes.items():
            out.setdefault(layer_key(name)[0], (name, shape))
        return out

    mine, theirs = kinds(base), kinds(other)
    for key, (name, shape) in mine.items():
        if key not in theirs:
            if key == "lm_head.weight" and other.tied_embeddings:
                continue
            raise ModelError(f"model {other.ref!r}: tensor {name!r} of the base is missing")
        if theirs[key][1] != shape:
            raise ModelError(f"model {other.ref!r}: tensor {theirs[key][0]!r} has shape {list(theirs[key][1])}, "
                             f"base has {list(shape)}")
