"""Any lm-evaluation-harness task, run through its Python API on the resident model (optional extra).

``pip install mergesearch[lm-eval]``. Options: ``task`` (a registered task or one defined in ``include_path``,
a folder of task YAMLs that may point to local data files), ``metric`` (e.g. ``acc``, ``acc_norm`` or
``exact_match,strict-match``), ``num_fewshot``. The common ``limit`` keeps the task's first ``limit`` documents
(lm-eval's own rule, identical in every call); ``seed`` seeds the few-shot sampler; ``split`` is not used
(lm-eval picks the task's evaluation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field as PydField

from mergesearch.errors import ConfigError, TrialError
from mergesearch.objectives.base import ObjectiveBase, ObjectiveContext, Params

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig


class LmEvalParams(Params):
    task: str
    include_path: Path | None = None
    metric: str = "acc"
    num_fewshot: int | None = PydField(default=None, ge=0)


class LmEval(ObjectiveBase):
    """One lm-eval task's metric; the task (and its dataset) is loaded once, at build time."""

    Params = LmEvalParams

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        try:
            from lm_eval.tasks import TaskManager, get_task_dict
        except ImportError:
            raise ConfigError(
                f"objective '{self.name}': lm-eval is not installed (pip install mergesearch[lm-eval])"
            ) from None
        p = self.params
        if p.include_path is not None and not p.include_path.is_dir():
            raise ConfigError(f"objective '{self.name}': include_path {p.include_path} is not a folder")
        manager = None
        # Indexing lm-eval's thousands of built-in task YAMLs takes ~10-30 s: look in include_path alone first.
        for defaults in ([False, True] if p.include_path else [True]):
            manager = TaskManager(include_path=p.include_path and str(p.include_path), include_defaults=defaults,
                                  verbosity="ERROR")
            if p.task in manager.all_tasks:
                break
        else:
            raise ConfigError(f"objective '{self.name}': unknown lm-eval task '{p.task}'")
        try:
            self.task_dict = get_task_dict([p.task], manager)
        except Exception as e:  # the task's dataset from the hub: offline, unknown, refused
            from mergesearch.errors import DataError
            from mergesearch.models import hub_reply

            raise DataError(f"objective '{self.name}': lm-eval task '{p.task}' could not load its data: "
                            f"{hub_reply(e)}") from None
        for task in self.task_dict.values():
            if p.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=p.num_fewshot)
            task.set_fewshot_seed(seed=config.seed)
        self.metric = p.metric if "," in p.metric else f"{p.metric},none"
        self._model: Any = None
        self._lm: Any = None

    def __call__(self, model: Any, tokenizer: Any) -> float:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._model is not model:  # the resident model is merged in place: one wrapper per worker
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.config.batch_size)
            self._model = model
        out = evaluate(lm=self._lm, task_dict=self.task_dict, limit=self.config.limit, bootstrap_iters=0,
                       log_samples=False, verbosity="ERROR")
        results = out["results"][self.params.task]
        if self.metric not in results:
            known = ", ".join(k for k in results if "," in k and "_stderr" not in k)
            raise TrialError(f"objective '{self.name}': no metric '{self.metric}' (task reports: {known})")
        return float(results[self.metric])
