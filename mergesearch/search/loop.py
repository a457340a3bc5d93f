"""The driver loop: ask the optimizer for as many candidates as there are idle workers, tell results as they
arrive, and keep the study in storage consistent at every step (so a crash or Ctrl-C leaves it resumable).

Only the driver touches the storage; workers only merge and score.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesearch.config import JobConfig
from mergesearch.errors import StudyError
from mergesearch.execution.base import Executor, TrialResult


@dataclass
class RunReport:
    """What a run did: the study, how many trials completed/failed in this run and in total."""

    study_name: str
    storage: str
    completed: int
    failed_this_run: int
    completed_this_run: int
    elapsed: float
    hypervolume: float | None = None
    interrupted: bool = False
    best: dict[str, float] = field(default_factory=dict)
    #: stopped by SIGTERM rather than Ctrl-C (the CLI then exits 143, not 130)
    terminated: bool = False
    #: trials a lower fidelity rung stopped in this run
    pruned_this_run: int = 0
    #: examples scored by every trial of the study (what ``search.max_examples`` counts)
    examples: int = 0


def objective_specs(config: JobConfig) -> list[tuple[str, str]]:
    """``(name, direction)`` of every objective, in config order (the study's value order)."""
    from mergesearch.objectives.registry import objective_class, validate_objective

    specs = []
    for o in config.objectives:
        validate_objective(o)
        cls = objective_class(o)
        specs.append((o.label, o.direction or cls.direction_for(cls.Params.model_validate(o.options))))
    return specs


def fingerprint(config: JobConfig) -> str:
    """A hash of what gives a study's trials their meaning (models, space, objectives)."""
    data = {
        "base_model": Path(config.base_model).name,
        "models": [Path(m).name for m in config.models],
        "space": config.space.model_dump(mode="json", by_alias=True),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path | None) -> str | None:
    """sha256 (first 16 hex digits) of a data file's bytes; None when absent or not a file."""
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def job_meaning(config: JobConfig) -> dict[str, Any]:
    """What gives a study's trials their meaning, as a JSON-ready dict: models (by folder name, so a moved
    project still resumes), dtype, space, objectives with the contents of their search data.

    Left out on purpose: the search settings (optimizer, budget, seed), execution, ``batch_size`` and the
    ``test`` files, which change how or when trials run or are re-checked, not what a stored score means.
    """
    objectives = []
    for o in config.objectives:
        d = o.model_dump(mode="json", exclude={"batch_size", "test", "data"})
        if o.data is not None:
            d["data"] = {"file": Path(o.data).name, "sha256": _file_digest(Path(o.data))}
        objectives.append(d)
    return {
        "base_model": Path(config.base_model).name,
        "models": [Path(m).name for m in config.models],
        "dtype": config.dtype,
        "space": config.space.model_dump(mode="json", by_alias=True),
        "objectives": objectives,
    }


def make_executor(config: JobConfig, workers: int | None = None, address: str | None = None) -> Executor:
    """The executor the config asks for, with a :class:`MergeWorkerFactory` for its workers."""
    from mergesearch.execution.worker import MergeWorkerFactory

    ex = config.execution
    factory = MergeWorkerFactory(config)
    if ex.executor == "local" and address is None:
        from mergesearch.execution.local import LocalExecutor

        return LocalExecutor(factory)
    from mergesearch.execution.ray_pool import RayExecutor
    from mergesearch.execution.worker import share_task_vectors

    return RayExecutor(factory, workers=workers or ex.workers, address=address or ex.address,
                       num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_retries=ex.max_retries,
                       prefetch=ex.prefetch, share=share_task_vectors if ex.share_task_vectors else None)


class SearchRun:
    """One invocation of ``mergesearch run``: open (or resume) the study and drive it to ``trials`` completed."""

    def __init__(self, config: JobConfig, *, storage: str | None = None, study_name: str | None = None,
                 trials: int | None = None, optimizer: str | None = None, seed: int | None = None,
                 new_study: bool = False) -> None:
        """Validate the job and open (or create) its study; an existing study is only read here.

        Args:
            new_study: the study must not exist yet (``--new-study``).

        Raises:
            ConfigError: bad optimizer, reference point or initial points.
            StudyError: the storage cannot be opened, or the study exists with ``new_study``. (A job that
                gives the stored trials another meaning is refused by :meth:`prepare`.)
        """
        from mergesearch.search.optimizers import OPTIMIZERS, Optimizer
        from mergesearch.search.study import DRIVER_ID, DriverLease, open_study, study_location
        from mergesearch.spaces import build_space, num_layers_of

        self.config = config
        self.storage, self.study_name = study_location(config, storage, study_name)
        self.target = trials or config.search.trials
        self.objectives = objective_specs(config)
        from mergesearch.merging.aligned import expert_sets

        self.space = build_space(config.space, base_model=config.base_model, models=list(config.models),
                                 num_layers=num_layers_of(config.base_model),
                                 dtype=config.dtype, seed=config.search.seed if seed is None else seed,
                                 objectives=[o.label for o in config.objectives if o.data is not None],
                                 # aligned experts computed (once: cached) before anything is stored
                                 aligned=expert_sets(config) if config.space.align != ["none"] else None)
        ref = config.search.reference_point
        if ref and set(ref) != {n for n, _ in self.objectives}:
            from mergesearch.errors import ConfigError

            raise ConfigError(f"search.reference_point must name every objective: {[n for n, _ in self.objectives]}")
        self.reference = [ref[n] for n, _ in self.objectives] if ref else None
        if (optimizer or config.search.optimizer) not in OPTIMIZERS:  # checked before a new study is created
            from mergesearch.errors import ConfigError

            raise ConfigError(f"unknown optimizer {optimizer or config.search.optimizer!r}; "
                              f"known: {', '.join(OPTIMIZERS)}")
        if config.space.twin is not None:  # checked before a new study is created
            from mergesearch.candidates import check_twin_rank
            from mergesearch.models import Checkpoint

            rank = config.space.twin.rank
            check_twin_rank(rank if isinstance(rank, int) else int(rank.high),
                            Checkpoint(config.base_model, allow_pickle=config.allow_pickle).shapes)
        self._initial = self._initial_points()  # before the study is opened: a bad point creates nothing
        from mergesearch.search.pareto import _local_file

        file = _local_file(self.storage)
        self._new_file = file if file is not None and not file.exists() else None
        self.study = open_study(self.storage, self.study_name, self.objectives, config_fingerprint=fingerprint(config),
                                meaning=job_meaning(config), new=new_study)
        #: the study was created by this run (so :meth:`abandon` may remove it again)
        self.created = self.study.user_attrs.get("created_by") == DRIVER_ID
        self.seed = config.search.seed if seed is None else seed
        self.recovered = 0
        #: trials being evaluated right now, and sampled ahead for a worker (``execution.prefetch``), kept up to
        #: date by :meth:`run`
        self.running = self.queued = 0
        #: examples scored by the study's trials, and trials pruned by this run (kept up to date by :meth:`run`)
        self.examples = self.pruned_run = 0
        self._prepared = False
        try:
            self.optimizer = Optimizer(self.study, self.space.distributions,
                                       name=optimizer or config.search.optimizer, seed=self.seed,
                                       options=dict(config.search.options), reference_point=self.reference,
                                       start_points=list(self.space.source_paths().values()))
            self.lease = DriverLease(self.study)
            self.lease.check()  # refuse a study another driver runs before loading any model
            self._load_fidelity()  # (reads only) so that a spent examples budget starts no worker
        except BaseException:
            self.abandon()
            raise

    def take_lease(self) -> None:
        """Take the study's driver lease, and keep it fresh, before the workers start: a second driver is then
        refused at once (in its constructor), before it loads any model. :meth:`prepare` takes it otherwise.

        The lease is the only thing written until :meth:`prepare`; :meth:`abandon` puts it back as it was. A job
        that gives the stored trials another meaning takes none: :meth:`prepare` refuses it (once the workers
        have started, so a broken model is named first), and nothing at all is written. Follow it with
        :meth:`run` or :meth:`abandon`: until then a thread keeps the lease fresh.

        Raises:
            StudyError: another live driver holds the lease, or the storage cannot be written.
        """
        from mergesearch.search.study import check_meaning

        if self.lease.held or self._prepared:
            return
        try:
            check_meaning(self.study, self.storage, job_meaning(self.config), fingerprint(self.config))
        except StudyError:
            return
        self._acquire_lease()
        self.lease.start()  # model loading may outlast the lease's staleness: refresh it meanwhile

    def _acquire_lease(self) -> None:
        """:meth:`DriverLease.acquire`, a failing first write (read-only storage, full disk) as one StudyError."""
        try:
            self.lease.acquire()
        except StudyError:
            raise
        except Exception as e:  # the first write: a read-only file or database, a full disk, a lost server
            from mergesearch.search.study import mask_url

            while e.__cause__ or e.__context__:  # optuna wraps the database's own (telling) error
                e = e.__cause__ or e.__context__
            raise StudyError(f"cannot write to storage {mask_url(self.storage)}: {type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]}") from None

    def prepare(self) -> None:
        """Check that the job gives the stored trials the same meaning, take the study's driver lease (unless
        :meth:`take_lease` did), recover orphaned trials, store the config and enqueue initial points.

        The constructor only validates and reads (so a bad input leaves an existing study untouched); this is
        the first write but the lease's. :meth:`run` calls it when needed; call it earlier to know
        :attr:`recovered`.

        Raises:
            StudyError: the job differs from the stored one (the first difference is named), or another live
                driver holds the study's lease.
        """
        from mergesearch.exporting import store_config
        from mergesearch.search.study import check_meaning, recover_orphans

        if self._prepared:
            return
        # here, not in the constructor: the workers have checked models and data by now, and a broken model
        # is a better first message than "the models differ from the stored ones"
        check_meaning(self.study, self.storage, job_meaning(self.config), fingerprint(self.config))
        if not self.lease.held:
            self._acquire_lease()
        self.recovered = recover_orphans(self.study)
        store_config(self.study, self.config)
        if not self.study.trials:
            for point in self._initial:
                self.optimizer.enqueue(point, {"initial": True})
        self._prepared = True

    def _initial_points(self) -> list[dict[str, Any]]:
        """``search.initial`` as complete parameter dicts (presets by name); checked before anything is written.

        A partial dict takes the space's documented defaults for what it leaves out (:meth:`MergeSpace.complete`);
        left to the sampler, the gaps would be random and the "recipe" a different one on every run.
        """
        from mergesearch.errors import ConfigError

        presets = self.space.presets()
        points = []
        for i, item in enumerate(self.config.search.initial):
            if isinstance(item, str) and item not in presets:
                raise ConfigError(f"search.initial: unknown preset '{item}' (known: {', '.join(presets)})")
            try:
                points.append(self.space.complete(presets[item] if isinstance(item, str) else item))
            except ConfigError as e:
                raise ConfigError(f"search.initial[{i}]: {str(e).removeprefix('params: ')}") from None
        return points

    def abandon(self) -> bool:
        """Undo what a run that failed or was stopped before its first result wrote: a study it created is
        deleted (with the storage file, if this run created that too); in an existing study, a lease taken
        before :meth:`prepare` wrote anything else is put back as it was (:meth:`DriverLease.give_back`), one
        still held after it is released.

        Returns:
            True when the study was removed.
        """
        import optuna

        lease = getattr(self, "lease", None)  # absent when the constructor failed before making it
        if lease is not None:
            lease.stop()  # first: a refresh must not write to a study being restored or deleted
        if not self.created or any("plan" in t.user_attrs for t in self.study.get_trials(deepcopy=False)):
            if lease is not None and lease.held and self._prepared:
                lease.release()
            elif lease is not None:
                lease.give_back()
            return False
        storage = self.study._storage
        optuna.delete_study(study_name=self.study_name, storage=storage)
        if self._new_file is not None and not optuna.get_all_study_names(storage):
            engine = getattr(storage, "engine", None)
            if engine is not None:
                engine.dispose()  # close SQLite's file handles before the file goes
            self._new_file.unlink(missing_ok=True)
        return True

    def _in_flight(self, trials: int, workers: int) -> None:
        """Split the trials submitted and not finished into running ones and ones queued ahead (prefetch)."""
        self.running, self.queued = min(trials, workers), max(0, trials - workers)

    def completed_count(self) -> int:
        from mergesearch.search.study import count_complete

        return count_complete(self.study)

    def run(self, executor: Executor, *, on_result: Callable[[TrialResult], None] | None = None,
            on_baseline: Callable[[str], None] | None = None, max_consecutive_failures: int = 25) -> RunReport:
        """Drive the study until ``trials`` trials are complete; Ctrl-C stops cleanly (study resumable).

        A study's first run scores the reference rows first (see :mod:`mergesearch.search.baselines`).

        Args:
            executor: the worker pool (idle/submit/completed).
            on_result: called after each result is stored (progress display).
            on_baseline: called with each reference row's name once it is scored.
            max_consecutive_failures: stop with :class:`StudyError` when this many trials fail in a row.
        """
        from mergesearch.execution.stop import Terminated, received
        from mergesearch.search.baselines import ensure_baselines
        from mergesearch.search.study import carried_attrs, trial_record

        self.prepare()
        start = time.perf_counter()
        inflight: dict[int, dict[str, Any]] = {}
        done_run = failed_run = streak = 0
        last_error = ""
        interrupted = terminated = False
        self.lease.start()
        # counted once, then kept here: the lease makes this driver the only writer of the study (and the
        # optimizer keeps the trials it reads once)
        complete = self.completed_count()
        self.optimizer.sole_writer = True
        self.running = self.queued = self.pruned_run = 0
        self._load_fidelity()
        try:
            if complete < self.target and not self.budget_spent():
                ensure_baselines(self.study, self.config, self.objectives, executor, on_baseline)
            while True:
                self._in_flight(len(inflight), executor.size)
                if self.lease.lost is not None:
                    raise StudyError(f"study '{self.study_name}' was taken over by another driver "
                                     f"({self.lease.lost}); this run stopped")
                if (complete >= self.target or self.budget_spent()) and not inflight:
                    break
                # pruned trials do not count towards `trials`: only full-fidelity results do
                n = 0 if self.budget_spent() else min(executor.idle(), self.target - complete - len(inflight))
                if n > 0:
                    self._enqueue_refinements(n, complete + len(inflight))
                    for trial in self.optimizer.asking(n):  # each to a worker while the next is sampled
                        spec = self.space.candidate(trial.params)
                        executor.submit(trial.number, self._job(spec))
                        inflight[trial.number] = {"params": trial.params, "spec": spec,
                                                  "attrs": carried_attrs(trial.user_attrs)}
                for res in executor.completed(timeout=0.5):
                    if res.engine_error is not None:  # a bug, not the candidate: re-queued (finally), run stopped
                        from mergesearch.errors import ExecutionError

                        err = ExecutionError(f"trial {res.trial}: engine error on {res.worker}: {res.error} (the "
                                             "trial was re-queued; --debug shows the worker's traceback)")
                        if hasattr(err, "add_note"):
                            err.add_note(res.engine_error)
                        raise err
                    job = inflight.pop(res.trial)
                    self._in_flight(len(inflight), executor.size)
                    record = trial_record(spec=job["spec"], worker=res.worker, timings=res.timings,
                                          attempts=res.attempts, summary=self.space.summary(job["params"]))
                    record.update(self._fidelity_record(res))
                    if res.ok and res.values is not None:
                        self.optimizer.tell(res.trial, [res.values[n] for n, _ in self.objectives], attrs=record)
                        complete += 1
                        done_run += 1
                        streak = 0
                    elif res.pruned:
                        self.optimizer.tell(res.trial, None, pruned=True, attrs=record)
                        self.pruned_run += 1
                        streak = 0
                    else:
                        self.optimizer.tell(res.trial, None, error=res.error, attrs=record)
                        failed_run += 1
                        streak += 1
                        last_error = res.error or ""
                    if on_result is not None:
                        on_result(res)
                    if streak >= max_consecutive_failures:
                        raise StudyError(f"{streak} trials failed in a row; last: {last_error}")
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Ray's waits re-raise it as a plain KeyboardInterrupt)
            interrupted = True
            terminated = isinstance(e, Terminated) or received()
        finally:
            self.lease.stop()
            self._requeue_running(inflight)
            self.optimizer.sole_writer = False
            self.lease.release()
        return RunReport(study_name=self.study_name, storage=self.storage, completed=self.completed_count(),
                         failed_this_run=failed_run, completed_this_run=done_run,
                         elapsed=time.perf_counter() - start, interrupted=interrupted,
                         hypervolume=self.hypervolume(), best=self.best(), terminated=terminated,
                         pruned_this_run=self.pruned_run, examples=self.examples)

    def _load_fidelity(self) -> None:
        """Read what the stored trials spent (examples) and reached (rung scores): a resumed run goes on from it."""
        from optuna.trial import TrialState

        from mergesearch.search.fidelity import RungHistory, examples_spent

        trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                               TrialState.FAIL))
        #: examples scored by every stored trial (the ``search.max_examples`` budget counts these)
        self.examples = examples_spent(trials)
        fidelity = self.config.search.fidelity
        names = [n for n, _ in self.objectives]
        self._history = RungHistory.of(trials, fidelity.rungs, names, fidelity.estimator) if fidelity else None

    def budget_spent(self) -> bool:
        """Whether ``search.max_examples`` is reached."""
        limit = self.config.search.max_examples
        return limit is not None and self.examples >= limit

    def _job(self, spec: dict[str, Any]) -> dict[str, Any]:
        """What a worker gets for a trial: the candidate spec, with the fidelity schedule if the job has rungs."""
        from mergesearch.search.fidelity import Rungs

        fidelity = self.config.search.fidelity
        if fidelity is None:
            return spec
        rungs = Rungs(sizes=tuple(fidelity.rungs), keep=fidelity.keep, names=tuple(n for n, _ in self.objectives),
                      signs=tuple(-1.0 if d == "maximize" else 1.0 for _, d in self.objectives),
                      seen=self._history.seen(), models=self._history.models(), estimator=fidelity.estimator)
        return {**spec, "rungs": rungs}

    def _fidelity_record(self, res: TrialResult) -> dict[str, Any]:
        """The user attrs of a result's examples and rung scores; counts them into this run's totals."""
        from mergesearch.search.fidelity import EXAMPLES_ATTR, PER_EXAMPLE_ATTR, RUNGS_ATTR

        self.examples += res.examples
        out: dict[str, Any] = {EXAMPLES_ATTR: res.examples}
        fidelity = self.config.search.fidelity
        if fidelity is not None and res.rungs:
            out[RUNGS_ATTR] = [{"n": n, "values": v} for n, v in zip(fidelity.rungs, res.rungs, strict=False)]
            if res.per_example:
                out[PER_EXAMPLE_ATTR] = res.per_example
            self._history.add(out[RUNGS_ATTR], res.per_example)
        return out

    def _requeue_running(self, inflight: dict[int, dict[str, Any]]) -> None:
        """Fail and re-enqueue every trial of this run still RUNNING, so a resumed run evaluates it again.

        Not only ``inflight``: an interrupt can land between ``ask`` creating a trial and its submission, or
        between a result's arrival and its ``tell``. While the lease is held no other driver has RUNNING
        trials here, so every RUNNING trial is this run's; after losing it, only the ones it created.
        """
        from optuna.trial import TrialState

        from mergesearch.search.study import DRIVER_ID, carried_attrs

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if self.lease.lost is not None and t.number not in inflight and t.user_attrs.get("driver") != DRIVER_ID:
                continue
            job = inflight.get(t.number)
            self.optimizer.tell(t.number, None, error="interrupted (run stopped)")
            self.optimizer.enqueue(job["params"] if job else dict(t.params),
                                   job["attrs"] if job else carried_attrs(t.user_attrs))

    def _enqueue_refinements(self, n: int, started: int) -> None:
        """Enqueue refinements for those of the next ``n`` trials (``started`` done or running before them) that
        fall in the last ``search.refine`` of the budget and are not served by trials already waiting."""
        from optuna.trial import TrialState

        from mergesearch.search.refine import refinements

        search = self.config.search
        k = min(n, started + n - (self.target - search.refine))
        if k <= 0:
            return
        k -= len(self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        for params, parent in refinements(self.study, self.space.distributions, k, search.refine_step, self.seed):
            self.optimizer.enqueue(params, {"refine_of": parent})

    def hypervolume(self) -> float | None:
        """Hypervolume of the completed trials, against the study's stored reference point (what ``front``
        prints); None before the first completed trial."""
        return self.hypervolume_pair()[0] if self.completed_count() else None

    def hypervolume_pair(self) -> tuple[float, float | None] | None:
        """``(raw, normalised or None)`` hypervolume, as :meth:`hypervolume`; None before the first trial."""
        from mergesearch.search.pareto import study_hypervolumes

        stored = "hv_reference" in self.study.user_attrs
        try:
            return study_hypervolumes(self.study, None if stored else self.reference)
        except StudyError:
            return None

    def best(self) -> dict[str, float]:
        """Best value reached so far per objective."""
        import optuna

        trials = [t for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        out: dict[str, float] = {}
        for i, (name, direction) in enumerate(self.objectives):
            vals = [t.values[i] for t in trials if t.values and math.isfinite(t.values[i])]
            if vals:
                out[name] = max(vals) if direction == "maximize" else min(vals)
        return out
