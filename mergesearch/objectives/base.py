"""The Objective protocol, the context objectives are built with, and the base class of every objective type.

An objective scores a resident model: ``objective(model, tokenizer) -> float``. Everything that does not change
between trials (data files, subsets, the base model's weights) is prepared once when the objective is built, so
a worker pays it once and each trial costs only the forward passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from mergesearch.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from mergesearch.config import ObjectiveConfig

Direction = Literal["maximize", "minimize"]
Split = Literal["search", "test"]


@runtime_checkable
class Objective(Protocol):
    """Anything that scores a model: a name (its column in the study), a direction and a call."""

    name: str
    direction: Direction

    def __call__(self, model: Any, tokenizer: Any) -> float: ...


@dataclass(frozen=True)
class ObjectiveContext:
    """What objectives may need besides the model and tokenizer.

    Attributes:
        base_state: the base model's weights by parameter name (read-only; may load lazily), for cost objectives.
        device: where the model lives (``cpu``, ``cuda:0``); inputs are moved to the model's own device anyway.
        split: ``search`` scores on each objective's ``data`` file, ``test`` on its held-out ``test`` file.
    """

    base_state: Mapping[str, torch.Tensor] | None = None
    device: str = "cpu"
    split: Split = "search"


class Params(BaseModel):
    """Type-specific options of one objective type; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectiveBase:
    """Common plumbing: name, direction (config overrides the type's default) and per-example details.

    Subclasses set ``Params`` (their options), ``default_direction``, ``needs_data`` and implement ``__call__``;
    they do their one-time preparation in ``__init__``.

    Attributes:
        last_details: per-example records of the last call (e.g. ``{"index": 3, "correct": True}``), or ``[]``.
    """

    Params: ClassVar[type[Params]] = Params
    default_direction: ClassVar[Direction] = "maximize"
    #: ``True``: the config must give a data file for the split being scored.
    needs_data: ClassVar[bool] = False

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        self.config = config
        self.context = context
        self.params = self.Params.model_validate(config.options)
        self.name = config.label
        self.direction: Direction = config.direction or self.direction_for(self.params)
        self.last_details: list[dict[str, Any]] = []

    @classmethod
    def direction_for(cls, params: Any) -> Direction:
        """The default direction given validated options (e.g. ``loglik`` with ``nll: true`` is minimised)."""
        return cls.default_direction

    def size(self) -> int:
        """Examples scored at full fidelity (the ``limit``-subset of the data, in its seeded order); 0 for an
        objective without examples (a cost), which is exact at every fidelity and scored once per trial."""
        return 0

    def score(self, model: Any, tokenizer: Any, start: int = 0, stop: int | None = None) -> list[dict[str, Any]]:
        """Per-example records of examples ``[start, stop)`` (default: to the end) of the seeded subset.

        Fidelity rungs score nested prefixes: the records of ``[0, n1)`` then ``[n1, n2)`` give, concatenated,
        exactly those of ``[0, n2)``, and :meth:`reduce` of any prefix is the objective on that prefix.
        """
        raise NotImplementedError(f"objective '{self.name}' has no per-example scores")

    def reduce(self, records: list[dict[str, Any]]) -> float:
        """The objective's value over the examples whose records are given (default: mean ``value``)."""
        return sum(r["value"] for r in records) / len(records)

    def __call__(self, model: Any, tokenizer: Any) -> float:
        """The objective's value at full fidelity (per-example records kept in :attr:`last_details`)."""
        self.last_details = self.score(model, tokenizer)
        return self.reduce(self.last_details)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, direction={self.direction!r})"

    def require_base(self) -> Mapping[str, torch.Tensor]:
        """The base model's weights, or a ConfigError if the context has none."""
        if self.context.base_state is None:
            raise ConfigError(f"objective '{self.name}': needs the base model's weights (give base_model)")
        return self.context.base_state
