"""The routed model: the shared model plus every expert's low-rank part, mixed per example by the router's α.

For each covered ``nn.Linear`` with shared weight W* the routed layer computes, per example b,

    y_b = x_b·W*ᵀ + Σ_t α_bt·(x_b·A_tᵀ)·B_tᵀ

i.e. W(x) = W* + Σ_t α_t(x)·B_t·A_t without ever materialising a per-example weight. The low-rank term is added by a
forward hook on the shared model's own module, so the shared model is not copied or rewritten (it may be the
search worker's resident model) and stays a plain HF model. The hooks do nothing unless a routed call is in
progress, so the shared model used directly is exactly θ*. PEFT's mixed-batch inference (``adapter_names``) picks
one adapter per example; a weighted mixture of adapters per example is not something PEFT does, hence the hooks.

All experts' factors of a module are concatenated, so the mix is two matmuls: x [B, L, in] @ A_catᵀ [in, T·r]
→ scale each expert's r columns by α_bt → @ B_catᵀ [T·r, out].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mergesearch.errors import ConfigError
from mergesearch.twin.correct import AffineMix, Corrections, block_output, with_block_output
from mergesearch.twin.factors import TwinFactors
from mergesearch.twin.router import Router, pooled_hidden
from mergesearch.twin.router import routing_mask as make_routing_mask


class LowRankMix(nn.Module):
    """All experts' factors of one linear module, concatenated; ``forward`` gives the α-mixed low-rank term.

    Buffers: ``a`` [T·r, in] (expert t's A in rows t·r..t·r+r−1), ``b`` [out, T·r].
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        t, r, _ = A.shape
        self.num_experts, self.rank = t, r
        self.register_buffer("a", A.reshape(t * r, A.shape[2]).to(dtype).contiguous())
        self.register_buffer("b", B.permute(1, 0, 2).reshape(B.shape[1], t * r).to(dtype).contiguous())

    def forward(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Σ_t α_bt·(x_b·A_tᵀ)·B_tᵀ for x [B, ..., in] and α [B', T] (B a multiple of B': generate's expansion
        for beams / several sequences repeats each row consecutively); returns [B, ..., out] in ``a``'s dtype."""
        if x.shape[0] != alpha.shape[0]:
            alpha = alpha.repeat_interleave(x.shape[0] // alpha.shape[0], dim=0)
        # each expert's weight repeated over its r columns, broadcast over the sequence dimensions
        w = alpha.to(self.a.dtype).repeat_interleave(self.rank, dim=1)
        w = w.reshape(w.shape[0], *([1] * (x.ndim - 2)), w.shape[1])
        return ((x.to(self.a.dtype) @ self.a.T) * w) @ self.b.T


class RoutedModel(nn.Module):
    """Shared model + routed low-rank experts; call it like a HF causal LM.

    ``model(input_ids=..., attention_mask=..., position_ids=...)`` routes each row on the shared model's pooled
    hidden state of its first ``router.window`` real tokens (see :mod:`mergesearch.twin.router`), then runs the
    shared model with the α-mixed adapters and returns its output (``.logits`` [B, L, V]). ``generate`` routes
    once on the prompt and keeps α for every decoding step. No task label is needed; for oracle routing pass
    ``alpha`` (an expert index or name: one-hot for every row; or a [B, T] tensor).

    Args:
        shared: the shared HF causal LM (θ*); hooks are added to its covered linear modules.
        factors: the experts' low-rank parts (modules must exist in ``shared`` as ``nn.Linear``).
        router: the trained router, or ``None`` (then every call must give ``alpha``).
        adapter_dtype: dtype of the low-rank path (float32 by default, like PEFT's adapters: the path is cheap
            and the sum is rounded once into the layer's output dtype).

    Call :meth:`detach` (or use the model as a context manager) to remove the hooks from ``shared``.
    """

    def __init__(self, shared: nn.Module, factors: TwinFactors, router: Router | None = None, *,
                 adapter_dtype: torch.dtype = torch.float32, corrections: Corrections | None = None):
        super().__init__()
        if router is not None and router.num_experts != len(factors.experts):
            raise ConfigError(f"twin router has {router.num_experts} outputs but there are "
                              f"{len(factors.experts)} experts")
        self.shared = shared
        self.router = router
        self.factors = factors
        self.experts, self.names = factors.experts, factors.names
        device = next(shared.parameters()).device
        # ModuleDict keys may not contain '.', so index mixers by position; ``targets`` keeps the names.
        self.targets = factors.modules
        self.mixers = nn.ModuleList(LowRankMix(factors.A[m], factors.B[m], adapter_dtype).to(device)
                                    for m in self.targets)
        self._alpha: torch.Tensor | None = None
        self._handles = []
        self._detached = False
        #: what fitting the factors to the experts did (a ``DistillReport``; None: plain SVD factors)
        self.distill_report: Any = None
        if factors.rank > 0:
            for name, mixer in zip(self.targets, self.mixers, strict=True):
                module = shared.get_submodule(name)
                if not isinstance(module, nn.Linear):
                    raise ConfigError(f"twin factors cover {name!r}, which is not a linear layer of the model")
                self._handles.append(module.register_forward_hook(self._hook(mixer)))
        #: per-task affine corrections of the blocks' outputs (variance-collapse correction), mixed by α too
        self.corrections = corrections
        self.affines = nn.ModuleList()
        if corrections is not None:
            if corrections.scale.shape[0] != len(self.experts):
                raise ConfigError(f"corrections for {corrections.scale.shape[0]} tasks but there are "
                                  f"{len(self.experts)} experts")
            for li, name in enumerate(corrections.layers):
                affine = AffineMix(corrections.scale[:, li].to(device), corrections.shift[:, li].to(device))
                self.affines.append(affine)
                self._handles.append(shared.get_submodule(name).register_forward_hook(self._affine_hook(affine)))

    def _affine_hook(self, affine: AffineMix):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._alpha is None:
                return None
            return with_block_output(output, affine(block_output(output), self._alpha))

        return hook

    def _hook(self, mixer: LowRankMix):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            alpha = self._alpha
            if alpha is None:  # not inside a routed call: the shared model as is
                return None
            return output + mixer(args[0], alpha).to(output.dtype)

        return hook

    # -- HF-model surface the objectives use ---------------------------------------------------------------

    @property
    def config(self) -> Any:
        return self.shared.config

    @property
    def device(self) -> torch.device:
        return next(self.shared.parameters()).device

    def get_input_embeddings(self) -> nn.Module:
        return self.shared.get_input_embeddings()

    # -- routing -----------------------------------------------------------------------------------------

    def expert_index(self, expert: int | str) -> int:
        """Position of an expert given by index, name or model reference."""
        if isinstance(expert, int) and 0 <= expert < len(self.experts):
            return expert
        for seq in (self.names, self.experts):
            if expert in seq:
                return seq.index(expert)
        raise ConfigError(f"unknown twin expert {expert!r} (experts: {list(self.names)})")

    def oracle(self, expert: int | str, batch: int) -> torch.Tensor:
        """One-hot α [batch, T] on one expert (float32)."""
        alpha = torch.zeros(batch, len(self.experts), device=self.device)
        alpha[:, self.expert_index(expert)] = 1.0
        return alpha

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, *,
              prompt_lengths: torch.Tensor | Sequence[int] | None = None,
              routing_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The router's α [B, T] (float32) for a batch.

        Pools ``routing_mask`` [B, L] when given, else each row's first min(``router.window``, prompt length)
        real tokens, with ``prompt_lengths`` [B] (default: the whole row is prompt).
        """
        if self.router is None:
            raise ConfigError("this twin model has no router: pass alpha (an expert or a [B, T] tensor)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if routing_mask is None:
            routing_mask = make_routing_mask(attention_mask, self.router.window, prompt_lengths)
        with self._mixing(None):  # the router reads the shared model, adapters off
            pooled = pooled_hidden(self.shared, input_ids, attention_mask, routing_mask.bool(), position_ids)
        return self.router.weights(pooled)

    def _alpha_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   position_ids: torch.Tensor | None, alpha: torch.Tensor | int | str | None,
                   prompt_lengths: torch.Tensor | Sequence[int] | None,
                   routing_mask: torch.Tensor | None) -> torch.Tensor:
        if self._detached:  # its hooks are gone: a call would silently be the shared model
            raise RuntimeError("this routed model was detached from its shared model")
        if alpha is None:
            return self.route(input_ids, attention_mask, position_ids, prompt_lengths=prompt_lengths,
                              routing_mask=routing_mask)
        if isinstance(alpha, (int, str)):
            return self.oracle(alpha, input_ids.shape[0])
        if alpha.ndim != 2 or alpha.shape != (input_ids.shape[0], len(self.experts)):
            raise ConfigError(f"twin alpha must be [batch, experts] = {[input_ids.shape[0], len(self.experts)]}, "
                              f"got {list(alpha.shape)}")
        return alpha.to(self.device, torch.float32)

    @contextmanager
    def _mixing(self, alpha: torch.Tensor | None) -> Iterator[None]:
        """Hooks add the α-mixed adapters inside the block (``None``: they add nothing)."""
        previous, self._alpha = self._alpha, alpha
        try:
            yield
        finally:
            self._alpha = previous

    # -- calls -------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, use_cache: bool | None = False,
                labels: torch.Tensor | None = None, alpha: torch.Tensor | int | str | None = None,
                prompt_lengths: torch.Tensor | Sequence[int] | None = None,
                routing_mask: torch.Tensor | None = None) -> Any:
        """Route, then run the shared model with the mixed adapters; returns the shared model's output.

        Args:
            input_ids, attention_mask, position_ids: [B, L], as for the HF model (any padding side).
            use_cache, labels: passed to the HF model.
            alpha: oracle routing instead of the router: an expert (index or name) or α [B, T].
            prompt_lengths: [B] prompt tokens of each row (e.g. prompt+answer teacher forcing), optional.
            routing_mask: [B, L] tokens to pool, overriding the window and ``prompt_lengths``.

        Returns:
            The HF ``CausalLMOutputWithPast`` (``.logits`` [B, L, V]).
        """
        a = self._alpha_for(input_ids, attention_mask, position_ids, alpha, prompt_lengths, routing_mask)
        with self._mixing(a):
            return self.shared(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=use_cache, labels=labels)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 alpha: torch.Tensor | int | str | None = None,
                 prompt_lengths: torch.Tensor | Sequence[int] | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """Route once on the prompts, then decode with the shared model's ``generate``, α fixed per row.

        ``generate_kwargs`` go to HF ``generate`` unchanged (its options are the generation config's, not ours).
        Returns the generated ids [B·num_return_sequences, L + new].
        """
        a = self._alpha_for(input_ids, attention_mask, None, alpha, prompt_lengths, None)
        with self._mixing(a):
            return self.shared.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def detach(self) -> nn.Module:
        """Remove the hooks from the shared model and return it; calling this routed model afterwards raises."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._detached = True
        return self.shared

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

