"""A user-written objective: ``target: module:function`` called as ``function(model, tokenizer, examples)``.

``module`` is an importable module name or a path to a ``.py`` file. ``examples`` are the split's JSONL
examples (deterministic subset applied; each with its ``_line``), or ``[]`` if the config gives no data file.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesearch.errors import ConfigError, TrialError
from mergesearch.objectives.base import ObjectiveBase, ObjectiveContext, Params
from mergesearch.objectives.data import load_examples

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class PythonParams(Params):
    #: ``package.module:function`` or ``path/to/file.py:function``.
    target: str


def import_target(target: str, label: str) -> Callable[..., Any]:
    """The function named by ``module:function``; a one-line ConfigError naming the target if it fails."""
    module_name, sep, func_name = target.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"objective '{label}': target '{target}' must look like 'module:function'")
    try:
        if module_name.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if spec is None or spec.loader is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except Exception as e:  # any failure inside user code is reported the same way
        reason = str(e).splitlines()[0] if str(e) else ""
        why = f"{type(e).__name__}: {reason}"
        raise ConfigError(f"objective '{label}': cannot import target '{target}' ({why})") from None
    if not callable(func):
        raise ConfigError(f"objective '{label}': target '{target}' is not callable")
    return func


class PythonObjective(ObjectiveBase):
    """Calls a user function; its return value must be a real number."""

    Params = PythonParams

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        self.function = import_target(self.params.target, self.name)
        has_data = getattr(config, "data" if context.split == "search" else "test") is not None
        self.examples = load_examples(config, context, ()) if has_data else []

    def __call__(self, model: Any, tokenizer: Any) -> float:
        import torch

        with torch.inference_mode():  # scoring: no autograd graph (the user's function may still enable it)
            try:
                value = self.function(model, tokenizer, self.examples)
            except Exception as e:  # the user's code judged this candidate: a failed trial, not an engine error
                why = (str(e).splitlines() or [""])[0]
                raise TrialError(f"objective '{self.name}': {self.params.target} raised {type(e).__name__}"
                                 f"{': ' + why if why else ''}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            msg = f"objective '{self.name}': {self.params.target} returned {value!r}, not a number"
            raise TrialError(msg) from None
        if math.isnan(value):
            raise TrialError(f"objective '{self.name}': {self.params.target} returned NaN")
        return value
