"""Take a trial out of a study: re-merge its plan, write a Hugging Face model directory with a replayable
recipe and its scores, or re-score the front on the held-out test split.

Everything needed is in the study itself: the job config is stored in the study's user attributes when the
study is created, and each trial stores its plan.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergesearch.config import JobConfig
from mergesearch.errors import StudyError
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


def _complete_trial(study: Any, number: int) -> Any:
    import optuna

    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or trials[number].state != optuna.trial.TrialState.COMPLETE:
        raise StudyError(f"study '{study.study_name}': trial {number} is not a completed trial")
    return trials[number]


def export_trial(storage: Any, study_name: str | None, trial_number: int, out_dir: str | Path, *,
                 overwrite: bool = False, absolute_paths: bool = False) -> Path:
    """Re-merge a completed trial's plan and write it as a Hugging Face model directory.

    The directory holds the weights (safetensors), config, tokenizer, ``recipe.yaml`` (replayed by
    ``mergesearch merge``; model paths relative to the directory unless ``absolute_paths``),
    ``mergekit_config.yml`` and ``scores.json`` (the trial's stored values). It is written atomically.

    Args:
        storage: a storage URL or an ``optuna.Study``.
        study_name: the study's name (may be ``None`` when a Study is passed).
        trial_number: which trial.
        out_dir: destination; refused if it exists and is not empty, unless ``overwrite``.
    """
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.merging.run import save_model_dir
    from mergesearch.search.pareto import objectives_of, open_existing_study

    out = Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        from mergesearch.errors import ConfigError

        raise ConfigError(f"output directory {out} exists and is not empty (use --overwrite)")
    study = open_existing_study(storage, study_name)
    trial = _complete_trial(study, trial_number)
    config = stored_config(study)
    plan = MergePlan.model_validate(trial.user_attrs["plan"])
    merger = ResidentMerger(config.base_model, list(config.models), dtype=config.dtype,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    model = merger.apply(plan)
    recipe = plan if absolute_paths else portable_plan(plan, out)
    names = [name for name, _ in objectives_of(study)]
    scores = {"study": study.study_name, "trial": trial.number, "values": dict(zip(names, trial.values, strict=True))}
    from safetensors import SafetensorError

    try:
        return save_model_dir(model, out, tokenizer_source=merger.tokenizer_path, recipe=recipe,
                              overwrite=overwrite, extra_files={"scores.json": json.dumps(scores, indent=2) + "\n"})
    except (OSError, SafetensorError) as e:  # a full disk, no permission (safetensors raises its own type)
        from mergesearch.errors import ModelError

        reason = (f"{e.strerror}: {e.filename}" if e.filename else e.strerror) if isinstance(e, OSError) and \
            e.strerror else (str(e).splitlines() or [""])[0]
        raise ModelError(f"cannot write {out} (nothing was exported): {reason}") from None


def validate_front(storage: Any, study_name: str | None, front: Any) -> Any:
    """Re-score every front trial on the objectives' held-out ``test`` files (search and test side by side).

    Returns:
        The front with each trial's ``test_values`` filled in.
    """
    from transformers import AutoTokenizer

    from mergesearch.errors import ConfigError
    from mergesearch.merging.apply import ResidentMerger
    from mergesearch.objectives import ObjectiveContext, build_objectives, evaluate
    from mergesearch.search.pareto import open_existing_study

    study = open_existing_study(storage, study_name)
    config = stored_config(study)
    with_test = [o for o in config.objectives if o.test is not None or o.data is None]
    if not any(o.test is not None for o in with_test):
        raise ConfigError("no objective of this study declares a 'test' split")
    merger = ResidentMerger(config.base_model, list(config.models), dtype=config.dtype,
                            allow_pickle=config.allow_pickle, trust_remote_code=config.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(merger.tokenizer_path)
    objectives = build_objectives(with_test, ObjectiveContext(base_state=merger.base_state, split="test"))
    trials = []
    for t in front.trials:
        model = merger.apply(MergePlan.model_validate(t.plan))
        trials.append(replace(t, test_values=evaluate(objectives, model, tokenizer)))
    return replace(front, trials=trials)
