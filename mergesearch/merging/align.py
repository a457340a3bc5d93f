"""Permutation alignment of decoder blocks (issue 17, non-local merging): the core, pure and model-free.

Two fine-tuned models can compute the same function with their hidden units in a different order. Before task
vectors τ = θ_expert − θ_base are taken, each expert can be permuted so that its units line up with the base's
(Git Re-Basin weight matching; ZipIt/REPAIR-style activation matching). A permutation never changes what the
expert computes, only which entries of its tensors sit where.

What is permuted, per decoder layer ``i`` (tensor names shared by Llama, Mistral and Qwen2 checkpoints):

- **MLP units** (``intermediate_size`` of them): row ``u`` of ``model.layers.{i}.mlp.gate_proj.weight`` and
  ``up_proj.weight`` (and their biases) and column ``u`` of ``down_proj.weight`` move together. The MLP computes
  ``down(act(gate(x)) * up(x))``; ``act`` and ``*`` are elementwise, so reordering units is exact.
- **Attention head groups** (``num_key_value_heads`` units): KV head ``g`` and the ``num_attention_heads /
  num_key_value_heads`` query heads that read it (grouped-query attention; in transformers' ``repeat_kv`` query
  head ``h`` reads KV head ``h // group``) move as one unit: ``head_dim``-row blocks of ``k_proj``/``v_proj``,
  ``group·head_dim``-row blocks of ``q_proj`` (and the q/k/v biases, e.g. Qwen2's), and the matching column
  blocks of ``o_proj``. Whole heads only: rotary embedding pairs dimension ``d`` with ``d + head_dim/2`` inside
  a head and gives each pair its own frequency, so dimensions inside a head are never permuted.

What is **not** permuted: residual-stream (hidden) dimensions. Embeddings, norms, ``lm_head``, the output rows of
``o_proj``/``down_proj`` and their biases keep their order, so each layer's alignment is independent of the
others and is solved exactly by one linear assignment (no alternating passes as Git Re-Basin needs when hidden
dimensions are permuted too).

Convention: a permutation ``p`` of ``n`` units is an int64 tensor of shape ``(n,)``; applying it puts old unit
``p[j]`` at new position ``j`` (``new[j] = old[p[j]]``, i.e. ``index_select(old, p)``). The matchers return the
permutation that, applied to the expert, lines it up with the base (or reference): aligning a copy that was
permuted by ``p`` returns ``p.inverse()``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mergesearch.errors import DataError, ModelError

#: model types whose decoder blocks use the Llama tensor names and head layout handled here.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

#: per-layer tensor name prefix (``AutoModelForCausalLM`` checkpoints of the supported types).
LAYER_PREFIX = "model.layers"

#: what ``to_tensors`` / ``save_permutations`` write; bump when the layout changes.
FORMAT = "mergesearch-align/1"


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Widths:
    """The shapes alignment depends on, read from a model config.

    The model type is checked (:func:`widths_of`) but not kept: Llama, Mistral and Qwen2 blocks of equal widths
    have the same tensors, so a permutation of one applies to the other.

    Attributes:
        hidden: residual width H (``hidden_size``).
        intermediate: MLP units I (``intermediate_size``).
        heads: query heads (``num_attention_heads``).
        kv_heads: key/value heads K (``num_key_value_heads``; equals ``heads`` without GQA); the attention units.
        head_dim: per-head width D (``head_dim``, default H / heads).
        layers: decoder layers L (``num_hidden_layers``).
    """

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.heads // self.kv_heads


def _field(config: Any, name: str) -> Any:
    # Checkpoint.config is a plain dict (config.json); models carry a PretrainedConfig.
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def widths_of(config: Any) -> Widths:
    """Read :class:`Widths` from a transformers config or a ``config.json`` dict; ModelError if unsupported."""
    model_type = _field(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"permutation alignment does not support model_type {model_type!r} "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    values: dict[str, int] = {}
    for key, field in (("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
                       ("heads", "num_attention_heads"), ("layers", "num_hidden_layers")):
        v = _field(config, field)
        if not isinstance(v, int) or v <= 0:
            raise ModelError(f"permutation alignment: config field {field} must be a positive integer, got {v!r}")
        values[key] = v
    kv = _field(config, "num_key_value_heads") or values["heads"]
    head_dim = _field(config, "head_dim") or values["hidden"] // values["heads"]
    if values["heads"] % kv:
        raise ModelError(f"permutation alignment: num_attention_heads {values['heads']} is not a multiple of "
                         f"num_key_value_heads {kv}")
    return Widths(kv_heads=int(kv), head_dim=int(head_dim), **values)


def check_alignable(config_a: Any, config_b: Any) -> Widths:
    """Raise ModelError (one line naming the field) unless two configs have the same widths; return them.

    Compared: hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim,
    num_hidden_layers. Both model types must be supported; they need not be equal (the tensors are the same).
    """
    a, b = widths_of(config_a), widths_of(config_b)
    if diff := width_difference(a, b):
        raise ModelError(f"cannot align models of different widths: {diff}")
    return a


def width_difference(a: Widths, b: Widths) -> str | None:
    """``"<config field> is <a> vs <b>"`` for the first field that differs, None when the widths are equal."""
    for key, field in (("hidden", "hidden_size"), ("intermediate", "intermediate_size"),
                       ("heads", "num_attention_heads"), ("kv_heads", "num_key_value_heads"),
                       ("head_dim", "head_dim"), ("layers", "num_hidden_layers")):
        if getattr(a, key) != getattr(b, key):
            return f"{field} is {getattr(a, key)} vs {getattr(b, key)}"
    return None


# ---------------------------------------------------------------------------------------------- permutation


@dataclass(frozen=True, eq=False)
class LayerPermutation:
    """One decoder layer's permutation.

    Attributes:
        mlp: int64 ``(intermediate_size,)``: new MLP unit ``j`` is old unit ``mlp[j]``.
        attn: int64 ``(num_key_value_heads,)``: new head group ``j`` (KV head plus its query heads) is old group
            ``attn[j]``.
    """

    mlp: torch.Tensor
    attn: torch.Tensor


def _is_identity(p: torch.Tensor) -> bool:
    return bool(torch.equal(p, torch.arange(len(p), dtype=p.dtype)))


def _inverse(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(len(p), dtype=p.dtype)
    return inv


def _check_perm(p: Any, n: int, what: str) -> torch.Tensor:
    if not isinstance(p, torch.Tensor) or p.shape != (n,) or p.dtype.is_floating_point:
        shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
        raise ModelError(f"permutation {what}: expected an integer tensor of shape ({n},), got {shape}")
    p = p.to("cpu", torch.int64)
    if not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise ModelError(f"permutation {what}: not a permutation of 0..{n - 1}")
    return p


@dataclass(frozen=True, eq=False)
class ModelPermutation:
    """A whole model's permutation: one :class:`LayerPermutation` per decoder layer, on the CPU.

    Build with :meth:`identity`, :meth:`random`, :meth:`from_tensors` or a matcher; each index tensor is checked
    to be a permutation of the right length for ``widths``.
    """

    widths: Widths
    layers: tuple[LayerPermutation, ...]

    def __post_init__(self) -> None:
        w = self.widths
        if len(self.layers) != w.layers:
            raise ModelError(f"permutation has {len(self.layers)} layers, the model has {w.layers}")
        checked = tuple(LayerPermutation(mlp=_check_perm(lp.mlp, w.intermediate, f"layers.{i}.mlp"),
                                         attn=_check_perm(lp.attn, w.kv_heads, f"layers.{i}.attn"))
                        for i, lp in enumerate(self.layers))
        object.__setattr__(self, "layers", checked)

    @classmethod
    def identity(cls, config: Any) -> ModelPermutation:
        w = config if isinstance(config, Widths) else widths_of(config)
        return cls(w, tuple(LayerPermutation(torch.arange(w.intermediate), torch.arange(w.kv_heads))
                            for _ in range(w.layers)))

    @classmethod
    def random(cls, config: Any, generator: torch.Generator | None = None) -> ModelPermutation:
        """Uniformly random MLP and head-group permutations per layer (tests, sanity checks)."""
        w = config if isinstance(config, Widths) else widths_of(config)
        return cls(w, tuple(LayerPermutation(torch.randperm(w.intermediate, generator=generator),
                                             torch.randperm(w.kv_heads, generator=generator))
                            for _ in range(w.layers)))

    def is_identity(self) -> bool:
        return all(_is_identity(lp.mlp) and _is_identity(lp.attn) for lp in self.layers)

    def inverse(self) -> ModelPermutation:
        """The permutation that undoes this one: ``apply(apply(s, p), p.inverse()) == s``."""
        return ModelPermutation(self.widths, tuple(LayerPermutation(_inverse(lp.mlp), _inverse(lp.attn))
                                                   for lp in self.layers))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelPermutation):
            return NotImplemented
        pairs = zip(self.layers, other.layers, strict=True)  # same widths, so the same layer count
        return self.widths == other.widths and all(
            torch.equal(a.mlp, b.mlp) and torch.equal(a.attn, b.attn) for a, b in pairs)

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside; equality is by value

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix}layers.{i}.mlp`` (I,) and ``{prefix}layers.{i}.attn`` (K,) int64 tensors (safetensors)."""
        out: dict[str, torch.Tensor] = {}
        for i, lp in enumerate(self.layers):
            out[f"{prefix}layers.{i}.mlp"] = lp.mlp.contiguous()
            out[f"{prefix}layers.{i}.attn"] = lp.attn.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], config: Any, prefix: str = "") -> ModelPermutation:
        """Inverse of :meth:`to_tensors`; ModelError naming the key if one is missing or not a permutation."""
        w = config if isinstance(config, Widths) else widths_of(config)
        layers = []
        for i in range(w.layers):
            keys = (f"{prefix}layers.{i}.mlp", f"{prefix}layers.{i}.attn")
            for k in keys:
                if k not in tensors:
                    raise ModelError(f"permutation tensors: missing {k!r}")
            layers.append(LayerPermutation(tensors[keys[0]], tensors[keys[1]]))
        return cls(w, tuple(layers))


# ---------------------------------------------------------------------------------------------------- apply


def _name(i: int, module: str, proj: str, kind: str = "weight") -> str:
    return f"{LAYER_PREFIX}.{i}.{module}.{proj}.{kind}"


def _get(state: Mapping[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in state:
        raise ModelError(f"permutation alignment: state has no tensor {name!r}")
    t = state[name]
    if tuple(t.shape) != shape:
        raise ModelError(f"permutation alignment: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _unit_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Row/column index moving whole ``block``-sized blocks: block ``j`` of the result is block ``perm[j]``."""
    return (perm[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def _layer_moves(w: Widths, i: int, lp: LayerPermutation) -> list[tuple[str, tuple[int, ...], int, torch.Tensor]]:
    """(tensor name, expected shape, dim, index) for every tensor of layer ``i`` that the permutation moves.

    Bias names are listed too; :func:`apply_permutation` skips those the state does not have.
    """
    H, I, D, G = w.hidden, w.intermediate, w.head_dim, w.group  # noqa: E741 (the papers' names)
    q_idx = _unit_index(lp.attn, G * D)  # a group's query heads are contiguous rows of q_proj
    kv_idx = _unit_index(lp.attn, D)
    moves: list[tuple[str, tuple[int, ...], int, torch.Tensor]] = []
    if not _is_identity(lp.mlp):
        moves += [(_name(i, "mlp", "gate_proj"), (I, H), 0, lp.mlp), (_name(i, "mlp", "up_proj"), (I, H), 0, lp.mlp),
                  (_name(i, "mlp", "down_proj"), (H, I), 1, lp.mlp),
                  (_name(i, "mlp", "gate_proj", "bias"), (I,), 0, lp.mlp),
                  (_name(i, "mlp", "up_proj", "bias"), (I,), 0, lp.mlp)]
    if not _is_identity(lp.attn):
        QD, KD = w.heads * D, w.kv_heads * D
        moves += [(_name(i, "self_attn", "q_proj"), (QD, H), 0, q_idx),
                  (_name(i, "self_attn", "k_proj"), (KD, H), 0, kv_idx),
                  (_name(i, "self_attn", "v_proj"), (KD, H), 0, kv_idx),
                  (_name(i, "self_attn", "o_proj"), (H, QD), 1, q_idx),
                  (_name(i, "self_attn", "q_proj", "bias"), (QD,), 0, q_idx),
                  (_name(i, "self_attn", "k_proj", "bias"), (KD,), 0, kv_idx),
                  (_name(i, "self_attn", "v_proj", "bias"), (KD,), 0, kv_idx)]
    return moves


def apply_permutation(state: Mapping[str, torch.Tensor], config: Any, perm: ModelPermutation
                      ) -> dict[str, torch.Tensor]:
    """A new state dict with ``perm`` applied; ``state`` is not modified.

    Args:
        state: tensor name -> tensor, any dtype and device (e.g. a model's ``state_dict()``); must hold every
            permuted weight of every layer, with the shapes ``config`` implies (ModelError naming the tensor).
        config: the model's config (transformers config, ``config.json`` dict or :class:`Widths`).
        perm: from a matcher, :meth:`ModelPermutation.random`, or a cache.

    Returns:
        A dict with the same keys; moved tensors are new (``index_select``: exact in any dtype), the others
        (embeddings, norms, ``lm_head``, o_proj/down_proj biases, identity layers) are the same objects as in
        ``state``.
    """
    w = config if isinstance(config, Widths) else widths_of(config)
    if diff := width_difference(perm.widths, w):
        raise ModelError(f"permutation does not fit the model: {diff} (permutation vs model)")
    out = dict(state)
    for i, lp in enumerate(perm.layers):
        for name, shape, dim, index in _layer_moves(w, i, lp):
            if name.endswith(".bias") and name not in state:
                continue  # most Llama checkpoints have no biases
            t = _get(state, name, shape)
            out[name] = t.index_select(dim, index.to(t.device))
    return out


def permute_tensor(name: str, tensor: torch.Tensor, perm: ModelPermutation) -> torch.Tensor:
    """One tensor of a state with ``perm`` applied, for code that reads a checkpoint tensor by tensor.

    Returns ``tensor`` itself when ``perm`` does not move it (not a per-layer q/k/v/o or gate/up/down tensor,
    or an identity layer), else a new tensor; ``apply_permutation(state)[name]`` equals it.
    """
    prefix = f"{LAYER_PREFIX}."
    if not name.startswith(prefix):
        return tensor
    layer = name[len(prefix):].split(".", 1)[0]
    if not layer.isdigit() or int(layer) >= len(perm.layers):
        return tensor  # not a decoder layer's tensor; a layer beyond the permutation cannot be a width match
    i = int(layer)
    for moved, shape, dim, index in _layer_moves(perm.widths, i, perm.layers[i]):
        if moved == name:
            t = _get({name: tensor}, name, shape)
            return t.index_select(dim, index.to(t.device))
    return tensor


# ------------------------------------------------------------------------------------------ weight matching


def _assign(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation p maximising Σ_j similarity[j, p[j]] (rows: reference units, columns: expert units)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(similarity.detach().cpu().double().numpy(), maximize=True)
    # rows come back sorted 0..n-1 for a square matrix, so cols[j] is the expert unit matched to reference unit j
    if not np.array_equal(rows, np.arange(len(rows))):  # pragma: no cover - scipy contract
        cols = cols[np.argsort(rows)]
    return torch.from_numpy(np.ascontiguousarray(cols)).to(torch.int64)


def _rows(t: torch.Tensor, units: int) -> torch.Tensor:
    """``(units · b, …)`` -> ``(units, b · …)``: each unit's entries as one vector."""
    return t.detach().reshape(units, -1)


def _cols(t: torch.Tensor, units: int) -> torch.Tensor:
    """``(H, units · b)`` -> ``(units, b · H)``: each unit's column block as one vector."""
    return t.detach().T.reshape(units, -1)


def weight_matching(base_state: Mapping[str, torch.Tensor], expert_state: Mapping[str, torch.Tensor],
                    config: Any, *, dtype: torch.dtype = torch.float64,
                    device: str | torch.device | None = None) -> ModelPermutation:
    """Git Re-Basin weight matching: per layer, the permutation of the expert's units closest to the base's.

    Per layer, the similarity of reference unit ``a`` and expert unit ``b`` is the inner product of their
    parameters: MLP units ``[gate[a,:], up[a,:], down[:,a]]`` (plus gate/up biases), head groups the group's
    q/k/v rows (``(group+2)·head_dim`` rows of width H, plus biases) and o_proj columns (``group·head_dim``).
    Since ‖permuted expert‖ does not depend on the permutation, maximising Σ similarity minimises
    ‖θ_base − π(θ_expert)‖², the size of the task vector, exactly; hidden dims are fixed, so one
    ``scipy.optimize.linear_sum_assignment`` per layer and unit kind is the optimum (no alternation).

    Args:
        base_state, expert_state: tensor name -> tensor (any dtype/device), e.g. state dicts. Only the per-layer
            q/k/v/o and gate/up/down tensors (and biases) are read, one at a time.
        config: the models' config (both have it; see :func:`check_alignable`).
        dtype, device: where the similarities are computed (default float64 on the base tensors' device). The
            MLP's similarity costs 2·I²·3H flops a layer (5e12 for Llama-3-8B: minutes on a few CPU cores in
            float64, well under a second on a GPU in float32, which is precise enough to rank units whose
            weights differ by more than a part in 10⁵).

    Returns:
        The permutation to apply to ``expert_state`` (:func:`apply_permutation`) to line it up with the base.
    """
    w = config if isinstance(config, Widths) else widths_of(config)
    H, I, D, K = w.hidden, w.intermediate, w.head_dim, w.kv_heads  # noqa: E741
    QD, KD = w.heads * D, K * D
    layers = []
    for i in range(w.layers):
        sims = []
        for unit_specs, n in (
            ([("mlp", "gate_proj", (I, H), _rows), ("mlp", "up_proj", (I, H), _rows),
              ("mlp", "down_proj", (H, I), _cols)], I),
            ([("self_attn", "q_proj", (QD, H), _rows), ("self_attn", "k_proj", (KD, H), _rows),
              ("self_attn", "v_proj", (KD, H), _rows), ("self_attn", "o_proj", (H, QD), _cols)], K),
        ):
            # Σ over tensors of (units × entries) products, not one concatenation: no extra copies of the layer.
            sim = None
            for module, proj, shape, flat in unit_specs:
                names = [(_name(i, module, proj), shape)]
                bias = _name(i, module, proj, "bias")
                if flat is _rows and (bias in base_state or bias in expert_state):  # in one only: _get says so
                    names.append((bias, shape[:1]))
                for name, shp in names:
                    base_t = _get(base_state, name, shp)
                    dev = base_t.device if device is None else torch.device(device)
                    a = flat(base_t.to(dev, dtype), n)
                    b = flat(_get(expert_state, name, shp).to(dev, dtype), n)
                    sim = a @ b.T if sim is None else sim + a @ b.T
            sims.append(sim)
        layers.append(LayerPermutation(mlp=_assign(sims[0]), attn=_assign(sims[1])))
    return ModelPermutation(w, tuple(layers))


# -------------------------------------------------------------------------------------- activation matching


class _CrossStats:
    """Running sums for the Pearson correlation of reference features with expert features.

    Features come as ``(units, width)`` per token (MLP: width 1; head groups: ``group·head_dim``). The
    similarity of units ``a`` and ``b`` is Σ_d corr(ref[a, d], exp[b, d]) (one term per dimension inside the
    unit, matched by position since dims inside a head are never permuted); only Σ_d cross terms are kept, so
    the memory is units² · width (I² for the MLP, K² · group · head_dim for attention), float64.
    """

    def __init__(self, units: int, width: int, device: torch.device):
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sa, self.sb = torch.zeros(units, width, **kw), torch.zeros(units, width, **kw)
        self.saa, self.sbb = torch.zeros(units, width, **kw), torch.zeros(units, width, **kw)
        self.sab = torch.zeros(units, units, width, **kw)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a, b: ``(tokens, units, width)`` activations of the reference and the expert on the same tokens."""
        a, b = a.to(self.sab.device, torch.float64), b.to(self.sab.device, torch.float64)
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += torch.einsum("tud,tvd->uvd", a, b)

    def similarity(self) -> torch.Tensor:
        """``(units, units)``: Σ_d Pearson correlation; a constant feature (σ = 0) correlates 0 with anything."""
        n = self.n
        ma, mb = self.sa / n, self.sb / n
        sda = (self.saa / n - ma * ma).clamp_min(0).sqrt()
        sdb = (self.sbb / n - mb * mb).clamp_min(0).sqrt()
        cov = self.sab / n - ma[:, None, :] * mb[None, :, :]
        denom = sda[:, None, :] * sdb[None, :, :]
        corr = torch.where(denom > 0, cov / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        return corr.sum(-1)


class _StopForward(Exception):
    """Raised by the last hook of a pass: the layers after it are not needed."""


def _as_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    else:
        ids, mask = batch, None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise DataError(f"activation matching: each batch must be int input_ids of shape (batch, tokens), got "
                        f"{shape}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise DataError("activation matching: attention_mask must have the shape of input_ids")
    return ids, mask


def _capture(model: nn.Module, w: Widths, layers: Sequence[int], ids: torch.Tensor, mask: torch.Tensor | None
             ) -> dict[tuple[int, str], torch.Tensor]:
    """Inputs of ``o_proj`` and ``down_proj`` of ``layers`` on one batch, as ``(tokens, units, width)``.

    Padding positions (mask 0) are dropped. The forward pass stops after the last layer needed.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    keep = None if mask is None else mask.to(device).reshape(-1).bool()
    found: dict[tuple[int, str], torch.Tensor] = {}
    last = (max(layers), "mlp")

    def hook(key: tuple[int, str], units: int) -> Any:
        def pre(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # (batch·tokens, features)
            if keep is not None:
                x = x[keep]
            found[key] = x.reshape(x.shape[0], units, -1).float()
            if key == last:
                raise _StopForward
        return pre

    handles = []
    try:
        for i in layers:
            # o_proj's input: the heads' attention outputs, concatenated in query-head order (a group contiguous);
            # down_proj's input: act_fn(gate(x)) * up(x), one value per MLP unit.
            for name, key, units in ((f"{LAYER_PREFIX}.{i}.self_attn.o_proj", (i, "attn"), w.kv_heads),
                                     (f"{LAYER_PREFIX}.{i}.mlp.down_proj", (i, "mlp"), w.intermediate)):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise ModelError(f"activation matching: model {type(model).__name__} has no module {name!r} "
                                     "(pass an AutoModelForCausalLM)") from None
                handles.append(module.register_forward_pre_hook(hook(key, units)))
        with contextlib.suppress(_StopForward):
            model(input_ids=ids, attention_mask=None if mask is None else mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return found


def activation_matching(base_model: nn.Module, expert_model: nn.Module,
                        input_ids_batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
                        config: Any = None, *, max_stats_bytes: int = 8 << 30) -> ModelPermutation:
    """ZipIt/REPAIR-style activation matching: per layer, match units by the correlation of their activations.

    Both models run on the same unlabelled prompts; forward pre-hooks record, per layer, the MLP units'
    activations ``act_fn(gate(x)) * up(x)`` (the input of ``down_proj``, ``(tokens, I)``) and the head groups'
    attention outputs before ``o_proj`` (``(tokens, K, group·head_dim)``). Unit similarity is the Pearson
    correlation over tokens (summed over the dims inside a head group), and one
    ``scipy.optimize.linear_sum_assignment`` per layer and unit kind maximises the total.

    Args:
        base_model, expert_model: ``AutoModelForCausalLM`` of a supported type (any device/dtype; run in
            ``eval()`` mode under ``torch.inference_mode``; their mode is restored).
        input_ids_batches: int64 ``(batch, tokens)`` tensors, or mappings with ``input_ids`` and optionally
            ``attention_mask`` (padding is excluded from the statistics). Read once into a list (the prompts
            are gone over once per chunk of layers), so pass a modest sample: a few hundred prompts suffice.
        config: the models' config; default ``base_model.config``. Checked against both models'.
        max_stats_bytes: memory for the float64 running sums, 8·(I² + 4·I + (K + 4)·heads·head_dim) bytes a
            layer on the base model's device (1.6 GiB a layer for Llama-3-8B, I = 14336). When all layers do not
            fit, layers are matched in chunks, one pass over the prompts per chunk, each pass stopping after the
            chunk's last layer. Besides, one batch's captured activations of a chunk's layers are held per model
            (float32, tokens · (I + heads·head_dim) per layer).

    Returns:
        The permutation to apply to the expert's state (:func:`apply_permutation`) to line it up with the base.
    """
    config = base_model.config if config is None else config
    w = check_alignable(config, base_model.config)
    check_alignable(config, expert_model.config)
    batches = [_as_batch(b) for b in input_ids_batches]
    if not batches or sum(int(ids.numel() if m is None else m.sum()) for ids, m in batches) < 2:
        raise DataError("activation matching needs at least two unpadded prompt tokens")
    device = next(base_model.parameters()).device
    per_layer = 8 * (w.intermediate ** 2 + 4 * w.intermediate + (w.kv_heads + 4) * w.heads * w.head_dim)
    chunk = max(1, min(w.layers, max_stats_bytes // per_layer))
    modes = base_model.training, expert_model.training
    base_model.eval()
    expert_model.eval()
    mlp_perms: dict[int, torch.Tensor] = {}
    attn_perms: dict[int, torch.Tensor] = {}
    try:
        with torch.inference_mode():
            for start in range(0, w.layers, chunk):
                layers = range(start, min(start + chunk, w.layers))
                stats = {}
                for i in layers:
                    stats[i, "mlp"] = _CrossStats(w.intermediate, 1, device)
                    stats[i, "attn"] = _CrossStats(w.kv_heads, w.group * w.head_dim, device)
                for ids, mask in batches:
                    a = _capture(base_model, w, layers, ids, mask)
                    b = _capture(expert_model, w, layers, ids, mask)
                    for key, st in stats.items():
                        st.update(a[key], b[key])
                for i in layers:
                    mlp_perms[i] = _assign(stats[i, "mlp"].similarity())
                    attn_perms[i] = _assign(stats[i, "attn"].similarity())
    finally:
        base_model.train(modes[0])
        expert_model.train(modes[1])
    return ModelPermutation(w, tuple(LayerPermutation(mlp_perms[i], attn_perms[i]) for i in range(w.layers)))


# ------------------------------------------------------------------------------------------------- caching


def save_permutations(path: str | Path, perms: Mapping[str, ModelPermutation],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write several models' permutations (model ref -> permutation) to one safetensors file.

    Tensors are ``{k}.layers.{i}.mlp`` / ``{k}.layers.{i}.attn`` for the k-th model; the header's metadata
    holds ``format``, ``models`` (JSON list of refs, in order), ``widths`` (JSON) and ``metadata`` (caller's
    strings, e.g. the method and a fingerprint of the inputs, for cache invalidation).
    """
    from safetensors.torch import save_file

    refs = list(perms)
    if not refs:
        raise ValueError("save_permutations: nothing to save")
    widths = {perms[r].widths for r in refs}
    if len(widths) != 1:
        raise ModelError("save_permutations: permutations of models of different widths")
    tensors: dict[str, torch.Tensor] = {}
    for k, ref in enumerate(refs):
        tensors.update(perms[ref].to_tensors(prefix=f"{k}."))
    header = {"format": FORMAT, "models": json.dumps(refs),
              "widths": json.dumps(widths.pop().__dict__), "metadata": json.dumps(dict(metadata or {}))}
    save_file(tensors, str(path), metadata=header)


def load_permutations(path: str | Path, config: Any) -> tuple[dict[str, ModelPermutation], dict[str, str]]:
    """Read :func:`save_permutations`' file: (model ref -> permutation, caller's metadata).

    ModelError (one line) if the file is unreadable, of another format, or made for other widths.
    """
    from safetensors import safe_open

    w = config if isinstance(config, Widths) else widths_of(config)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # SafetensorError or OSError
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelError(f"alignment cache {path}: cannot read ({reason})") from None
    if header.get("format") != FORMAT:
        raise ModelError(f"alignment cache {path}: format {header.get('format')!r}, expected {FORMAT!r}")
    stored = Widths(**json.loads(header["widths"]))
    if diff := width_difference(stored, w):
        raise ModelError(f"alignment cache {path}: made for other widths: {diff} (cache vs model)")
    refs = json.loads(header["models"])
    perms = {ref: ModelPermutation.from_tensors(tensors, w, prefix=f"{k}.") for k, ref in enumerate(refs)}
    return perms, json.loads(header.get("metadata", "{}"))


def task_vector_norm(base_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                     names: Iterable[str] | None = None) -> float:
    """‖θ − θ_base‖₂ over ``names`` (default: every tensor of ``base_state``), in float64 (a sanity figure)."""
    total = 0.0
    for n in base_state if names is None else names:
        d = state[n].detach().double() - base_state[n].detach().double().to(state[n].device)
        total += float((d * d).sum())
    return math.sqrt(total)
