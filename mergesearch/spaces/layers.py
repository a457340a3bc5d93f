"""Layer-wise architecture choices (Sakana DFS / HM3 style): which layer fills each output slot.

Output slot ``k`` is filled by one choice: ``merged`` (the merged layer at the slot's source depth), ``base``,
one source model (its layer at that depth, copied), or ``skip``. The slot's own depth is ``k mod L`` (L = the
base's layer count), so ``slots = r·L`` lays the network out r times as in Sakana's DFS; with
``depth_offset = D`` an extra integer in ``[-D, D]`` per slot moves the source depth to
``clamp(k mod L + offset, 0, L - 1)``.

Repair, so every parameter vector decodes to a valid network with ``min_layers <= kept <= max_layers``:
too few kept slots → the earliest skipped slots are filled with the space's fill choice (``merged`` if
allowed, else the first non-skip choice); too many → the latest kept slots are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mergesearch.config import LayerSpace
from mergesearch.errors import ConfigError

SKIP = "skip"
MERGED = "merged"
BASE = "base"

#: a resolved choice: ``"merged"``, ``"skip"``, ``-1`` (the base) or an expert's index.
Token = str | int


def resolve_choice(choice: str, models: list[str]) -> Token:
    """Map a choice as written in the YAML to a token.

    A model is named by its entry in ``models``, that entry's folder name, or its 0-based index.

    Raises:
        ConfigError: the choice names no known model.
    """
    if choice in (MERGED, SKIP):
        return choice
    if choice == BASE:
        return -1
    for i, m in enumerate(models):
        if choice in (m, Path(m).name, str(i)):
            return i
    known = [MERGED, BASE, SKIP] + [Path(m).name for m in models] + [str(i) for i in range(len(models))]
    raise ConfigError(f"space.layers.choices: unknown choice '{choice}' (known: {', '.join(known)})")


@dataclass(frozen=True)
class LayerPlan:
    """Validated layer-space settings for a base of ``num_layers`` layers."""

    slots: int
    choices: tuple[str, ...]
    tokens: tuple[Token, ...]
    min_layers: int
    max_layers: int
    depth_offset: int
    num_layers: int

    @classmethod
    def build(cls, cfg: LayerSpace, models: list[str], num_layers: int) -> LayerPlan:
        """Check ``cfg`` against the models; every problem is a one-line ConfigError naming the key."""
        slots = num_layers if cfg.slots is None else cfg.slots
        if slots < 1:
            raise ConfigError(f"space.layers.slots: must be >= 1, got {slots}")
        if len(set(cfg.choices)) != len(cfg.choices):
            raise ConfigError(f"space.layers.choices: repeated entries in {cfg.choices}")
        tokens = tuple(resolve_choice(c, models) for c in cfg.choices)
        if len(set(tokens)) != len(tokens):
            raise ConfigError(f"space.layers.choices: two entries name the same model in {cfg.choices}")
        if all(t == SKIP for t in tokens):
            raise ConfigError("space.layers.choices: needs at least one choice other than 'skip'")
        lo = 1 if cfg.min_layers is None else cfg.min_layers
        hi = slots if cfg.max_layers is None else cfg.max_layers
        if lo < 1:
            raise ConfigError(f"space.layers.min_layers: must be >= 1, got {lo}")
        if lo > slots:
            raise ConfigError(f"space.layers.min_layers: {lo} > slots ({slots})")
        if lo > hi:
            raise ConfigError(f"space.layers.min_layers: {lo} > max_layers ({hi})")
        if cfg.depth_offset < 0:
            raise ConfigError(f"space.layers.depth_offset: must be >= 0, got {cfg.depth_offset}")
        return cls(slots, tuple(cfg.choices), tokens, lo, min(hi, slots), cfg.depth_offset, num_layers)

    @property
    def fill(self) -> Token:
        """The token a repair puts into a skipped slot."""
        return MERGED if MERGED in self.tokens else next(t for t in self.tokens if t != SKIP)

    def depth(self, slot: int, offset: int = 0) -> int:
        """Source layer index of ``slot`` (clamped into ``[0, num_layers)``)."""
        return min(self.num_layers - 1, max(0, slot % self.num_layers + offset))

    def repair(self, tokens: list[Token]) -> list[Token]:
        """Enforce ``min_layers <= kept <= max_layers`` deterministically (see the module docstring)."""
        out = list(tokens)
        kept = sum(t != SKIP for t in out)
        for k in range(len(out)):
            if kept >= self.min_layers:
                break
            if out[k] == SKIP:
                out[k], kept = self.fill, kept + 1
        for k in reversed(range(len(out))):
            if kept <= self.max_layers:
                break
            if out[k] != SKIP:
                out[k], kept = SKIP, kept - 1
        return out


def runs(filled: list[tuple[Token, int]]) -> list[tuple[Token, int, int]]:
    """Coalesce consecutive kept slots into slices.

    Args:
        filled: ``(token, source_depth)`` for each kept slot, in output order (no ``skip``).

    Returns:
        ``(token, start, end)`` runs: consecutive slots with the same token and contiguous depths
        ``start, start+1, ..., end-1`` form one run (one output slice).
    """
    out: list[tuple[Token, int, int]] = []
    for token, depth in filled:
        if out and out[-1][0] == token and out[-1][2] == depth:
            out[-1] = (token, out[-1][1], depth + 1)
        else:
            out.append((token, depth, depth + 1))
    return out
