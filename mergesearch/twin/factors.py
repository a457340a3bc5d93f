"""Twin-Merging's exclusive knowledge: per expert, a rank-r truncated SVD of θt − θ* for each targeted linear weight.

The shared expert θ* is whatever static merge the resident model holds. Expert t's exclusive part of a 2-D weight
W of the transformer blocks (all of them, or those ``modules`` / ``layers`` select, as PEFT's ``target_modules``
/ ``layers_to_transform`` do) is D_t = θt[W] − θ*[W] = (θ0[W] + τt[W]) − θ*[W], built from the merger's cached
task vectors (no expert is read again), truncated to rank r and kept as LoRA-shaped factors B_t [out, r],
A_t [r, in] with B_t·A_t ≈ D_t. Singular values are split as √S on each side, so both factors have the same scale
(no factor underflows or overflows when cast to half precision).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from mergesearch.errors import ConfigError
from mergesearch.models import layer_key

if TYPE_CHECKING:
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.twin.router import Router

#: Exact SVD below this many entries (or when r is a large share of the smaller side): fast enough, and exact.
EXACT_SVD_MAX_NUMEL = 1 << 20
#: Randomized SVD: extra columns sampled beyond r, and power iterations (Halko et al.; 4 gives near-exact
#: leading singular vectors for the slowly decaying spectra of task-vector differences).
OVERSAMPLE = 8
POWER_ITERS = 4


@dataclass(frozen=True)
class TwinFactors:
    """The experts' exclusive parts as stacked low-rank factors, one entry per covered linear module.

    Attributes:
        experts: the experts' model references (as the merger names them), in router-output order (T of them).
        names: a short name per expert (adapter directory names on export).
        rank: r, the rank kept for every tensor.
        A: module name (e.g. ``model.layers.0.self_attn.q_proj``) -> A factors [T, r, in] (float32).
        B: module name -> B factors [T, out, r] (float32); ``B[m][t] @ A[m][t]`` ≈ θt − θ* of ``m.weight``.
    """

    experts: tuple[str, ...]
    names: tuple[str, ...]
    rank: int
    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]

    @property
    def modules(self) -> list[str]:
        """The covered module names, in checkpoint order."""
        return list(self.A)

    def delta(self, expert: int, module: str) -> torch.Tensor:
        """The rank-r exclusive part B_t·A_t of one module's weight [out, in] (float32)."""
        return self.B[module][expert] @ self.A[module][expert]

    def num_params(self) -> int:
        """Entries of all factors of all experts: Σ_modules T·r·(out + in)."""
        return sum(a.numel() + b.numel() for a, b in zip(self.A.values(), self.B.values(), strict=True))

    def to(self, device: torch.device | str) -> TwinFactors:
        """The same factors on ``device``."""
        return TwinFactors(self.experts, self.names, self.rank, {k: v.to(device) for k, v in self.A.items()},
                           {k: v.to(device) for k, v in self.B.items()})


def target_weights(model: nn.Module, tensor_names: Sequence[str]) -> Iterator[str]:
    """The parameter names the factors may cover: 2-D ``weight`` of an ``nn.Linear`` inside the decoder layers.

    Embeddings, the LM head, norms and biases stay shared (Twin-Merging factorises the blocks' linear maps; only
    ``nn.Linear`` layers can take a LoRA adapter in PEFT and a forward hook here).
    """
    for name in tensor_names:
        if layer_key(name)[1] is None or not name.endswith(".weight"):
            continue
        module = model.get_submodule(name.removesuffix(".weight"))
        if isinstance(module, nn.Linear) and module.weight.ndim == 2:
            yield name


def module_matches(module: str, entry: str) -> bool:
    """PEFT's ``target_modules`` rule for one list entry: the module's full name equals it or ends with ``.entry``."""
    return module == entry or module.endswith("." + entry)


def select_targets(weights: Sequence[str], modules: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None, *, key: str = "twin targets") -> list[str]:
    """The weights (of ``weights``, in their order) whose module ``modules`` and ``layers`` select.

    Args:
        weights: candidate ``<module>.weight`` names inside the decoder layers (e.g. :func:`target_weights`).
        modules: module names or suffixes (PEFT ``target_modules``); ``None``: all.
        layers: decoder layer indices (PEFT ``layers_to_transform``); ``None``: all.
        key: how the error messages name the setting.

    Raises:
        ConfigError: an entry of ``modules`` or ``layers`` that selects nothing (a typo must not silently shrink
            the family), or an empty selection.
    """
    mods = [w.removesuffix(".weight") for w in weights]
    present = sorted({layer_key(w)[1] for w in weights} - {None})
    for entry in modules or ():
        if not any(module_matches(m, entry) for m in mods):
            kinds = sorted({m.rsplit(".", 1)[-1] for m in mods})
            raise ConfigError(f"{key}: module {entry!r} matches no linear module of the decoder layers "
                              f"(their names end in: {', '.join(kinds)})")
    for layer in layers or ():
        if layer not in present:
            raise ConfigError(f"{key}: layer {layer} does not exist (the model has layers "
                              f"{present[0]}..{present[-1]})" if present else f"{key}: the model has no layers")
    out = [w for w, m in zip(weights, mods, strict=True)
           if (modules is None or any(module_matches(m, e) for e in modules))
           and (layers is None or layer_key(w)[1] in layers)]
    if not out:
        raise ConfigError(f"{key}: modules {list(modules or [])} and layers {list(layers or [])} select no module "
                          "together")
    return out


def truncated_svd(delta: torch.Tensor, rank: int, name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of a matrix: exact SVD for small ones, randomized (``torch.svd_lowrank``) for large.

    Args:
        delta: [out, in] float32.
        rank: r, 0 ≤ r ≤ min(out, in).
        name: the tensor's name, for the error message.
        seed: seeds the randomized SVD's Gaussian test matrix (results do not depend on the global RNG).

    Returns:
        ``(B [out, r], A [r, in])`` with B = U·√S, A = √S·Vᴴ, float32.

    Raises:
        ConfigError: ``rank`` larger than min(out, in).
    """
    out_f, in_f = delta.shape
    max_rank = min(out_f, in_f)
    if rank > max_rank:
        raise ConfigError(f"twin rank {rank} is larger than tensor {name!r} {tuple(delta.shape)} allows "
                          f"(max rank {max_rank})")
    if rank == 0:
        return delta.new_zeros(out_f, 0), delta.new_zeros(0, in_f)
    if delta.numel() <= EXACT_SVD_MAX_NUMEL or 2 * (rank + OVERSAMPLE) >= max_rank:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        # svd_lowrank draws its test matrix from the global RNG: fork it so results are seeded and callers'
        # random streams are untouched.
        devices = [delta.device] if delta.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=min(rank + OVERSAMPLE, max_rank), niter=POWER_ITERS)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].mT
    root = s.sqrt()
    return (u * root).contiguous(), (root[:, None] * vh).contiguous()


def compute_factors(merger: ResidentMerger, rank: int, *, experts: Sequence[str] | None = None,
                    names: Sequence[str] | None = None, seed: int = 0, modules: Sequence[str] | None = None,
                    layers: Sequence[int] | None = None) -> TwinFactors:
    """Factor every expert's exclusive part against the shared model the merger holds now.

    Call after ``merger.apply(plan)`` (the shared merge). Uses the merger's cached τ and base tensors and the
    resident model's current weights; computes in float32 whatever the model dtype.

    Args:
        merger: holds θ* (``merger.model``), θ0 (``merger.base_state``) and τt (``merger.delta``).
        rank: r kept per tensor (0: no exclusive parts; the routed model is the shared model).
        experts: the experts to factor, as the merger names them (default: all of ``merger.models``).
        names: a short name per expert (default: each reference's last path component).
        seed: seeds the randomized SVDs.
        modules, layers: which linear modules of the decoder layers get factors (:func:`select_targets`;
            default: all of them).

    Returns:
        The stacked factors, on the merger's device.

    Raises:
        ConfigError: a negative rank, a rank larger than some covered tensor allows, an unknown expert, a module
            or layer that selects nothing, or a shared model whose layers are not the base's (a plan that adds,
            drops or reorders layers).
    """
    if rank < 0:
        raise ConfigError(f"twin rank must be ≥ 0, got {rank}")
    experts = tuple(merger.models if experts is None else experts)
    unknown = [e for e in experts if e not in merger.models]
    if unknown or not experts:
        raise ConfigError(f"twin expert {unknown[0]!r} was not loaded by the merger (loaded: {merger.models})"
                          if unknown else "twin merging needs at least one expert")
    names = tuple(names) if names is not None else _short_names(experts)
    if len(names) != len(experts) or len(set(names)) != len(names):
        raise ConfigError(f"twin expert names must be distinct, one per expert: got {list(names)} for "
                          f"{len(experts)} experts")
    layer_map = getattr(merger, "layer_map", None)
    if layer_map is not None and tuple(layer_map) != tuple(range(merger.num_layers)):
        raise ConfigError("twin merging needs a shared model with the base's layers in order; the plan maps "
                          f"output layers to base layers {list(layer_map)}")
    model = merger.model
    targets = select_targets(list(target_weights(model, merger.tensor_names)), modules, layers)
    for name in targets:  # refuse an impossible rank before spending time on any SVD
        shape = tuple(model.get_parameter(name).shape)
        if rank > min(shape):
            raise ConfigError(f"twin rank {rank} is larger than tensor {name!r} {shape} allows "
                              f"(max rank {min(shape)})")
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in targets:
            shared = model.get_parameter(name).detach().float()
            base = merger.base_state[name].float()
            pairs = [truncated_svd(base + merger.delta(e, name).to(shared.device, torch.float32) - shared,
                                   rank, name, seed) for e in experts]
            module = name.removesuffix(".weight")
            B[module] = torch.stack([b for b, _ in pairs])
            A[module] = torch.stack([a for _, a in pairs])
    return TwinFactors(experts, names, rank, A, B)


def _short_names(experts: Sequence[str]) -> tuple[str, ...]:
    from mergesearch.exporting import model_names

    # model_names prefixes clashing names with "i:", which is not a portable directory name
    return tuple(n.replace(":", "-") for n in model_names(experts))


def extra_params(factors: TwinFactors, router: Router | None = None) -> int:
    """Parameters a routed model holds beyond its shared model: all experts' factors plus the router's."""
    return factors.num_params() + (0 if router is None else sum(p.numel() for p in router.parameters()))


def extra_param_ratio(factors: TwinFactors, router: Router | None, model: nn.Module) -> float:
    """``extra_params / parameters of the shared model`` — the routed family's cost relative to a static merge."""
    return extra_params(factors, router) / sum(p.numel() for p in model.parameters())
