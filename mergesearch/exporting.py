"""Take a trial out of a study: re-merge its plan, write a Hugging Face model directory with a replayable
recipe and its scores, or re-score the front on the held-out test split.

Everything needed is in the study itself: the job config is stored in the study's user attributes when the
study is created, and each trial stores its plan.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mergesearch.candidates import stored_candidate
from mergesearch.config import JobConfig
from mergesearch.errors import StudyError
from mergesearch.merging.aligned import merger_models
from mergesearch.merging.plan import MergePlan

CONFIG_ATTR = "job_config"


def stored_config(study: Any) -> JobConfig:
    """The job config a study was created with (see :func:`store_config`)."""
    raw = study.user_attrs.get(CONFIG_ATTR)
    if raw is None:
        raise StudyError(f"study '{study.study_name}' was not created by mergesearch run (no stored job config)")
    return JobConfig.model_validate(raw)


def store_config(study: Any, config: JobConfig) -> None:
    """Keep the job config with the study (once), so front/pick/export need nothing else."""
    if CONFIG_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_ATTR, config.model_dump(mode="json", by_alias=True))


def portable_plan(plan: MergePlan, root: Path) -> MergePlan:
    """The plan with local model paths made relative to ``root`` (hub ids and other strings unchanged)."""

    def rel(ref: str | None) -> str | None:
        if ref is None or not os.path.isabs(ref):
            return ref
        return os.path.relpath(ref, root)

    data = plan.to_dict()
    data["base_model"] = rel(plan.base_model)
    for m in data.get("models") or []:
        m["model"] = rel(m["model"])
    for sl in data.get("slices") or []:
        sl["base_model"] = rel(sl.get("base_model"))
        for src in sl["sources"]:
            src["model"] = rel(src["model"])
    if data.get("tokenizer_source"):
        data["tokenizer_source"] = rel(data["tokenizer_source"])
    return MergePlan.model_validate({k: v for k, v in data.items() if v is not None})


def model_names(models: Sequence[str]) -> list[str]:
    """A short name per model (its folder or hub id's last part); the index where two names would clash."""
    names = [Path(str(m)).name or str(m) for m in models]
    return [n if names.count(n) == 1 else f"{i}:{n}" for i, n in enumerate(names)]


def param_label(name: str, models: Sequence[str]) -> str:
    """A parameter's name with its model index replaced by the model's name: ``weight.1.3.mlp`` →
    ``weight[code-expert].3.mlp`` (parameters not per model are unchanged)."""
    head, _, rest = name.partition(".")
    index, _, tail = rest.partition(".")
    if head not in ("weight", "density") or not index.isdigit() or int(index) >= len(models):
        return name
    return f"{head}[{model_names(models)[int(index)]}]" + (f".{tail}" if tail else "")


@dataclass
class TrialInfo:
    """What a study knows about one trial, parameters named by model.

    Attributes:
        number: the trial number; state: ``COMPLETE``, ``FAIL``, ``RUNNING``, ``WAITING`` or ``PRUNED``.
        values: objective name → score (COMPLETE trials only, else None).
        params: labelled parameter name (see :func:`param_label`) → value, in the space's order.
        plan: the decoded merge plan (None until the trial was evaluated).
        summary, origin: the one-line plan summary; ``recipe`` / ``refines #n`` / "".
        fail_reason: why a FAIL trial failed.
        details: worker, attempts, timings (seconds by phase), examples scored and the scores at each fidelity
            rung reached (``rungs``: a PRUNED trial's partial scores), when stored.
    """

    study: str
    number: int
    state: str
    values: dict[str, float] | None
    params: dict[str, Any]
    plan: dict[str, Any] | None
    summary: str = ""
    origin: str = ""
    fail_reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def recipe_yaml(self) -> str | None:
        """The plan as a replayable recipe (``mergesearch merge``), or None when there is no plan yet."""
        from mergesearch.merging.plan import plan_to_yaml

        return None if self.plan is None else plan_to_yaml(MergePlan.model_validate(self.plan))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the recipe as a dict under ``recipe``)."""
        return {"study": self.study, "trial": self.number, "state": self.state, "values": self.values,
                "params": self.params, "recipe": self.plan, "summary": self.summary,
                **({"origin": self.origin} if self.origin else {}),
                **({"fail_reason": self.fail_reason} if self.fail_reason else {}), **self.details}


def _trial(study: Any, number: int) -> Any:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise StudyError(f"study '{study.study_name}' has no trial {number} (trials 0-{len(trials) - 1})"
                         if trials else f"study '{study.study_name}' has no trials")
    return trials[number]


def describe_trial(study: Any, number: int) -> TrialInfo:
    """A trial's scores, parameters (named by model), plan and state/failure reason.

    Raises:
        StudyError: no such trial.
    """
    from mergesearch.search.pareto import _origin, objectives_of

    t = _trial(study, number)
    raw = study.user_attrs.get(CONFIG_ATTR) or {}
    models = [str(m) for m in raw.get("models") or []]
    names = [n for n, _ in objectives_of(study)]
    params = dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})  # WAITING: enqueued values
    values = dict(zip(names, map(float, t.values), strict=True)) if t.values and t.state.name == "COMPLETE" \
        else None
    details = {k: t.user_attrs[k] for k in ("worker", "attempts", "timings", "examples", "rungs") if k in t.user_attrs}
    return TrialInfo(study=study.study_name, number=t.number, state=t.state.name, values=values,
                     params={param_label(k, models): v for k, v in params.items()},
                     plan=t.user_attrs.get("plan"), summary=str(t.user_attrs.get("summary", "")),
                     origin=_origin(t.user_attrs), fail_reason=t.user_attrs.get("fail_reason"), details=details)


def export_trial(storage: Any, study_name: str | None, trial_number: int, out_dir: str | Path, *,
                 overwrite: bool = False, absolute_paths: bool = False,
                 progress: Callable[[str], None] | None = None) -> Path:
    """Re-merge a trial's plan and write it as a Hugging Face model directory.

    Any evaluated trial can be exported (failed ones too: their plan is stored); ``pick`` chooses one by
    preference. The directory holds the weights (safetensors), config, tokenizer, ``recipe.yaml`` (replayed by
    ``mergesearch merge``; model paths relative to the directory unless ``absolute_paths``),
    ``mergekit_config.yml`` and ``scores.json`` (the trial's stored values, null unless COMPLETE). It is
    written atomically.

    Args:
        storage: a storage URL (or SQLite file path) or an ``optuna.Study``.
        study_name: the study's name (may be ``None`` when a Study is passed).
        trial_number: which trial.
        out_dir: destination; refused if it exists and is not empty, unless ``overwrite``.
        progress: called with a short line before each slow step (loading, merging, writing).
    """
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.search.pareto import open_existing_study

    say = progress or (lambda _msg: None)
    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        from mergesearch.errors import ConfigError

        raise ConfigError(f"output directory {out} exists and is not empty (use --overwrite)")
    study = open_existing_study(storage, study_name)
    config = stored_config(study)
    info = describe_trial(study, trial_number)
    if info.plan is None:
        raise StudyError(f"study '{study.study_name}': trial {trial_number} ({info.state}) has not been evaluated: "
                         "it has no recipe yet")
    candidate = stored_candidate(_trial(study, trial_number).user_attrs)
    say(f"loading the base and {len(config.models)} models")
    merger = ResidentMerger(config.base_model, merger_models(config), dtype=config.dtype,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    ctx = candidate_context(config, merger)
    say(f"merging trial {trial_number} ({info.summary or candidate.plan.merge_method})")
    model = candidate.build(ctx)
    recipe = candidate.plan if absolute_paths else portable_plan(candidate.plan, out)
    scores = {"study": study.study_name, "trial": info.number, "state": info.state, "values": info.values,
              "family": candidate.family}
    from safetensors import SafetensorError

    say(f"writing {out}")
    try:
        return candidate.export(ctx, model, out, recipe=recipe, overwrite=overwrite,
                                extra_files={"scores.json": json.dumps(scores, indent=2) + "\n"})
    except (OSError, SafetensorError) as e:  # a full disk, no permission (safetensors raises its own type)
        from mergesearch.errors import ModelError

        reason = (f"{e.strerror}: {e.filename}" if e.filename else e.strerror) if isinstance(e, OSError) and \
            e.strerror else (str(e).splitlines() or [""])[0]
        raise ModelError(f"cannot write {out} (nothing was exported): {reason}") from None


def candidate_context(config: JobConfig, merger: Any) -> Any:
    """What building a stored candidate needs outside a worker: the tokenizer and the search-split prompts."""
    from transformers import AutoTokenizer

    from mergesearch.candidates import CandidateContext, objective_prompts
    from mergesearch.objectives import ObjectiveContext, build_objectives

    tokenizer = AutoTokenizer.from_pretrained(merger.tokenizer_path)
    objectives = build_objectives([o for o in config.objectives if o.data is not None],
                                  ObjectiveContext(base_state=merger.base_state, split="search"))
    return CandidateContext(merger, tokenizer, objective_prompts(objectives), seed=config.search.seed)


def validate_front(storage: Any, study_name: str | None, front: Any,
                   progress: Callable[[str], None] | None = None) -> Any:
    """Re-score every front trial on the objectives' held-out ``test`` files (search and test side by side).

    Args:
        progress: called with a short line before loading the models and before each trial.

    Returns:
        The front with each trial's ``test_values`` filled in.
    """
    from mergesearch.errors import ConfigError
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate
    from mergesearch.search.pareto import open_existing_study

    study = open_existing_study(storage, study_name)
    config = stored_config(study)
    with_test = [o for o in config.objectives if o.test is not None or o.data is None]
    if not any(o.test is not None for o in with_test):
        raise ConfigError("no objective of this study declares a 'test' split")
    say = progress or (lambda _msg: None)
    say(f"loading the base and {len(config.models)} models")
    merger = ResidentMerger(config.base_model, merger_models(config), dtype=config.dtype,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    ctx = candidate_context(config, merger)
    objectives = build_objectives(with_test, ObjectiveContext(base_state=merger.base_state, split="test"))
    trials = []
    for i, t in enumerate(front.trials):
        say(f"test split: trial {t.number} ({i + 1}/{len(front.trials)})")
        candidate = stored_candidate(_trial(study, t.number).user_attrs)
        model = candidate.build(ctx)
        try:
            trials.append(replace(t, test_values=evaluate(objectives, model, ctx.tokenizer)))
        finally:
            candidate.release(model)
    return replace(front, trials=trials)
