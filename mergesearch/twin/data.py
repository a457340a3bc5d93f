"""The prompts a routed family is fitted on, kept apart from the prompts its trials are scored on.

A twin candidate's factors (``space.twin.distill``) and router are fitted on prompts of each task. When those are
the task objective's own search prompts, the trial is scored on what it was fitted to: distilled twins then score
near 1.0 on the search split whatever they do on new inputs, and the front is decided by the cost axis alone.
``space.twin.fit_data`` (task objective name -> a ``.txt`` or JSONL file of that task's prompts) gives every
task a separate fit set; it must be disjoint from the objective's search data, which is checked here, before any
fitting, so no scoring prompt reaches the distillation or the router.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mergesearch.errors import ConfigError, DataError


def read_fit_prompts(path: str | Path, *, key: str = "space.twin.fit_data") -> list[str]:
    """The prompts of one fit file: ``.txt`` (one per line) or JSONL with ``prompt`` (or ``text``) fields.

    Raises:
        ConfigError: a missing or malformed file, or one without prompts (one line, prefixed by ``key``).
    """
    from mergesearch.merging.aligned import read_prompts

    try:
        out = read_prompts(Path(path))
    except DataError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not out:
        raise ConfigError(f"{key}: {path}: no prompts")
    return out


def check_disjoint(fit: Sequence[str], scoring: Sequence[str], *, key: str = "space.twin.fit_data") -> None:
    """ConfigError (one line) when a fit prompt is also a scoring prompt (compared after stripping whitespace).

    Args:
        fit: the prompts a routed family is fitted on.
        scoring: the prompts its trials are scored on (the objective's loaded search examples).
    """
    scored = {p.strip() for p in scoring}
    shared = [p for p in dict.fromkeys(fit) if p.strip() in scored]
    if shared:
        raise ConfigError(f"{key}: {len(shared)} of {len(set(fit))} fit prompts are also prompts the trials are "
                          f"scored on (e.g. {shared[0]!r}); use prompts disjoint from the objective's data")


def check_fit_data(fit_data: Mapping[str, str | Path], objectives: Sequence[str]) -> None:
    """A job's ``space.twin.fit_data`` against the routed experts' task objectives (before anything is stored).

    Args:
        fit_data: task objective name -> fit file.
        objectives: the objectives the router's experts serve, in router order.

    Raises:
        ConfigError: a name that is not one of ``objectives``, an objective without a fit file, or a file that
            cannot be read or holds no prompts (one line each).
    """
    unknown = [k for k in fit_data if k not in objectives]
    if unknown:
        raise ConfigError(f"space.twin.fit_data: {unknown[0]!r} is not a routed task objective "
                          f"(routed: {', '.join(objectives)})")
    missing = [o for o in objectives if o not in fit_data]
    if missing:
        raise ConfigError(f"space.twin.fit_data: no fit prompts for {missing[0]!r} (give one file per routed task: "
                          f"{', '.join(objectives)})")
    for objective in objectives:
        read_fit_prompts(fit_data[objective], key=f"space.twin.fit_data.{objective}")


def fit_prompts(objective: str, path: str | Path | None, scoring: Sequence[str]) -> list[str]:
    """What a twin candidate fits on for ``objective``: its fit file's prompts, checked disjoint from ``scoring``
    (the prompts the objective scores); without a fit file (``path`` None), ``scoring`` itself.

    Raises:
        ConfigError: see :func:`read_fit_prompts` and :func:`check_disjoint`.
    """
    if path is None:
        return list(scoring)
    key = f"space.twin.fit_data.{objective}"
    fit = read_fit_prompts(path, key=key)
    check_disjoint(fit, scoring, key=key)
    return fit
