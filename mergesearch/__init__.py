"""mergesearch: multi-objective search over merge recipes for fine-tuned transformer models.

The Python API mirrors the CLI::

    from mergesearch import load_config, SearchRun, load_front, pick, export

    front = load_front("sqlite:///demo.db", "demo")
    choice = pick(front, {"reverse": 1, "swap": 1, "sort": 1}, minimums={"swap": 0.6})
    export("sqlite:///demo.db", "demo", choice.trial.number, "merged-model")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module; resolved on first use so `import mergesearch` stays light (no torch/ray/optuna import).
_LAZY = {
    "load_config": "mergesearch.config",
    "JobConfig": "mergesearch.config",
    "MergePlan": "mergesearch.merging.plan",
    "ResidentMerger": "mergesearch.merging.apply",
    "merge_config": "mergesearch.merging.run",
    "SearchRun": "mergesearch.search.loop",
    "load_front": "mergesearch.search.pareto",
    "pick": "mergesearch.search.preference",
    "export": "mergesearch.exporting",
    "stored_config": "mergesearch.exporting",
    "validate_front": "mergesearch.exporting",
    "build_demo": "mergesearch.demo.build",
    "load_model": "mergesearch.candidates",
}
_ALIASES = {"export": "export_trial"}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:
    from mergesearch.candidates import load_model
    from mergesearch.config import JobConfig, load_config
    from mergesearch.demo.build import build_demo
    from mergesearch.exporting import export_trial as export
    from mergesearch.exporting import stored_config, validate_front
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.plan import MergePlan
    from mergesearch.merging.run import merge_config
    from mergesearch.search.loop import SearchRun
    from mergesearch.search.pareto import load_front
    from mergesearch.search.preference import pick


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'mergesearch' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), _ALIASES.get(name, name))
