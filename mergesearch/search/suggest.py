"""Preference in, model out: ask the ``hm3`` policy for the layer path it expects best for a preference.

:func:`suggest` (what ``mergesearch suggest JOB --prefer A=2,B=1`` runs) rebuilds the policy and the value model
from the stored trials and asks them for the plan they expect best for the preference ω (weights normalised to sum
1, objectives not named get 0), by the ASF that ``pick`` ranks a front by
(:meth:`~mergesearch.search.optimizers.hm3.HM3Sampler.suggest`): the stored trials at their measured values compete
with new plans (the networks' best path, the policy's samples, the front's neighbourhood) at their pessimistic value
under the value model (a Gaussian process), so a new plan is proposed only when it is surely better, else the stored
trial best for ω again. It evaluates that point as a new trial of the study (user attr ``suggested_for``) and says
where it lands: on the front or not, and its rank among the front's trials by the preference's ASF
(:func:`mergesearch.search.preference.pick`; a stored trial with the same values ties with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mergesearch.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from mergesearch.config import JobConfig
    from mergesearch.execution.base import Executor

SUGGESTED_ATTR = "suggested_for"


@dataclass
class Suggestion:
    """What :func:`suggest` proposed and where it landed.

    Attributes:
        trial: the new trial's number (None when only proposed, see :func:`propose`).
        params: its parameters; summary: the space's one-line description of them.
        weights: the preference, normalised (objective name -> weight, sum 1).
        values: its objective values by name (None if the evaluation failed: see ``error``).
        on_front: it is non-dominated among the study's trials.
        rank: its rank (1 = best) among the front's trials by the preference's ASF, counting it in (trials with
            the same objective values tie with it); None when it is not on the front. front_size: the number of
            trials on the front.
        lines: human-readable report lines.
    """

    trial: int | None
    params: dict[str, Any]
    weights: dict[str, float]
    summary: str = ""
    values: dict[str, float] | None = None
    error: str | None = None
    on_front: bool = False
    rank: int | None = None
    front_size: int = 0
    lines: list[str] = field(default_factory=list)


def preference_weights(prefer: str | Mapping[str, float], names: Sequence[str]) -> dict[str, float]:
    """Normalised weights by objective name from ``"A=2,B=1"`` or a mapping.

    Raises:
        ConfigError: one line: malformed text, an unknown objective, a negative or non-finite weight, all zero.
    """
    from mergesearch.search.preference import _weights, parse_prefer

    given = parse_prefer(prefer) if isinstance(prefer, str) else dict(prefer)
    if not given:
        raise ConfigError("--prefer: give at least one OBJ=WEIGHT")
    w = _weights(given, list(names))
    return dict(zip(names, map(float, w), strict=True))


def propose(study: optuna.Study, distributions: Mapping[str, Any], weights: Mapping[str, float], *, seed: int,
            options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The params the ``hm3`` policy rebuilt from ``study`` proposes for ``weights`` (nothing is evaluated).

    Args:
        study: the study (its completed trials train the policy).
        distributions: the search space (must have ``layer.<k>`` slots).
        weights: normalised weights by objective name, in any order (see :func:`preference_weights`).
        seed: the policy's seed (the study's ``search.seed``).
        options: ``hm3`` options (``search.options`` when the study runs ``hm3``).

    Raises:
        ConfigError: a space without layer slots, or too few completed trials.
    """
    from mergesearch.search.optimizers.hm3 import HM3Sampler, check_layer_space, validate_options

    check_layer_space(distributions)
    names = study.user_attrs.get("objective_names") or list(weights)
    w = np.array([float(weights.get(n, 0.0)) for n in names])
    sampler = HM3Sampler(distributions, seed, **validate_options(options or {}))
    return sampler.suggest(study, w)


def suggest(config: JobConfig, prefer: str | Mapping[str, float], *, storage: str | None = None,
            study_name: str | None = None, executor: Executor | None = None, workers: int | None = None,
            address: str | None = None) -> Suggestion:
    """Propose the path the trained policy expects best for ``prefer``, evaluate it as a new trial, report.

    Args:
        config: the job (as ``mergesearch run`` reads it); the study must exist and have completed trials.
        prefer: ``"A=2,B=1"`` or ``{"A": 2, "B": 1}``; unnamed objectives get weight 0.
        storage, study_name: the study (defaults as for ``run``).
        executor: where to evaluate; None: :func:`mergesearch.search.loop.make_executor` with ``workers``
            (default 1) and ``address``.

    Returns:
        The :class:`Suggestion`; ``lines`` is what the command prints.

    Raises:
        ConfigError: unknown objective, negative weight, a space without ``layers:``, too few trials.
    """
    from mergesearch.search.loop import SearchRun, make_executor, objective_specs
    from mergesearch.search.optimizers.hm3 import check_layer_space, validate_options

    names = [n for n, _ in objective_specs(config)]
    weights = preference_weights(prefer, names)
    search = config.search.model_copy(update={"refine": 0, "initial": []})
    config = config.model_copy(update={"search": search})
    run = SearchRun(config, storage=storage, study_name=study_name, optimizer="random")
    check_layer_space(run.space.distributions)
    options = validate_options(config.search.options) if config.search.optimizer == "hm3" else {}
    params = propose(run.study, run.space.distributions, weights, seed=run.seed, options=options)
    run.take_lease()  # before the first write and before workers start: a running driver refuses us at once
    try:
        run.optimizer.enqueue(params, {SUGGESTED_ATTR: weights})
        run.target = run.completed_count() + 1
        own = executor is None
        if own:
            executor = make_executor(config, workers or 1, address)
    except BaseException:
        run.abandon()  # gives the lease back
        raise
    try:
        run.run(executor)
    finally:
        if own and hasattr(executor, "close"):
            executor.close()
    return report(run.study, params, weights, run.space.summary(params))


def report(study: optuna.Study, params: Mapping[str, Any], weights: Mapping[str, float],
           summary: str = "") -> Suggestion:
    """Where the newest trial suggested for ``weights`` landed on the study's front."""
    from optuna.trial import TrialState

    from mergesearch.search.pareto import load_front
    from mergesearch.search.preference import pick

    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(SUGGESTED_ATTR) is not None
            and t.params == dict(params)]
    trial = max(mine, key=lambda t: t.number) if mine else None
    out = Suggestion(trial=None if trial is None else trial.number, params=dict(params), weights=dict(weights),
                     summary=summary)
    w = ", ".join(f"{n}={v:.3g}" for n, v in weights.items())
    out.lines.append(f"preference {w}: suggested {summary or params}")
    if trial is None or trial.state != TrialState.COMPLETE:
        out.error = None if trial is None else str(trial.user_attrs.get("fail_reason", trial.state.name))
        out.lines.append(f"trial {out.trial}: not evaluated ({out.error})")
        return out
    names = study.user_attrs.get("objective_names") or [f"f{i}" for i in range(len(trial.values))]
    out.values = dict(zip(names, trial.values, strict=True))
    out.lines.append(f"trial {trial.number}: " + ", ".join(f"{n}={v:.4g}" for n, v in out.values.items()))
    front = load_front(study)
    out.front_size = len(front.trials)
    out.on_front = any(t.number == trial.number for t in front.trials)
    if out.on_front:
        ranking = pick(front, {n: v for n, v in weights.items() if v > 0}).ranking
        # a stored trial with the very same objective values is a tie, not a better point: count only the
        # trials ranked ahead with other values (pick orders exact ties arbitrarily, by trial number)
        ahead = ranking[: [t.number for t in ranking].index(trial.number)]
        out.rank = 1 + sum(list(t.values.values()) != list(trial.values) for t in ahead)
        out.lines.append(f"on the front: rank {out.rank} of {out.front_size} by this preference's ASF")
    else:
        out.lines.append(f"not on the front ({out.front_size} trials): dominated by a stored trial")
    return out


__all__ = ["SUGGESTED_ATTR", "Suggestion", "preference_weights", "propose", "report", "suggest"]
