"""The Ray executor: a pool of resident worker actors fed asynchronously, surviving killed worker processes.

Each actor builds its Worker once, in its own ``__init__``, from the picklable factory — the Worker loads its
models from disk there (memory-mapped safetensors), so a restarted actor rebuilds itself without any big
constructor argument in the object store. The driver keeps at most one trial per actor and collects results
with ``ray.wait`` as they finish: no generation barrier. With ``prefetch``, that many more trials wait in the
driver's queue and go to the next actor that finishes, as soon as its result is collected. A trial whose actor
process dies is put back in the queue (bounded by ``max_retries``) and the actor, restarted by Ray
(``max_restarts=-1``), is probed before it gets new work, since a call to a restarting actor only returns once
it is back.

Only the driver touches the study storage; workers get plans and return scores. On a cluster, run the driver
where the storage lives, e.g. as a Ray job on the head node (``--address auto`` attaches to that cluster)::

    RAY_API_SERVER_ADDRESS=http://HEAD:8265 ray job submit --working-dir . -- \
        mergesearch run job.yaml --address auto

(Ray 2.60 has token authentication on: the CLI also needs ``RAY_AUTH_MODE=token`` with the cluster's token in
``~/.ray/auth_token``.) Every node needs the models at the paths the job names.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mergesearch.errors import ExecutionError
from mergesearch.execution.base import TrialResult, WorkerFactory
from mergesearch.execution.local import one_line, run_trial

#: Seconds to wait for a TCP connection to the cluster's address before declaring it unreachable.
CONNECT_TIMEOUT = 5.0
#: Seconds between probes of an actor Ray reports unavailable (a restart in progress).
PROBE_INTERVAL = 0.5


class _TrialActor:
    """The body of each Ray actor: one resident Worker (``max_concurrency=1``: one trial at a time)."""

    def __init__(self, factory: WorkerFactory) -> None:
        import ray

        self.pid = os.getpid()
        self.name = f"{ray.util.get_node_ip_address()}:{self.pid}"
        self.node = ray.get_runtime_context().get_node_id()
        # A factory failure is reported through ready() as one line, rather than as an actor death with a
        # remote traceback (and without Ray restarting the actor into the same failure).
        try:
            self.worker, self.error = factory(), None
        except Exception as exc:
            self.worker, self.error = None, one_line(exc)

    def ready(self) -> tuple[str, str, str | None]:
        return self.name, self.node, self.error

    def run(self, trial: int, plan: dict[str, Any], submitted_at: float) -> TrialResult:
        return run_trial(self.worker, trial, plan, submitted_at, self.name)


@dataclass
class _Job:
    trial: int
    plan: dict[str, Any]
    submitted_at: float
    attempts: int = 1


@dataclass
class _Slot:
    """One actor and what the driver knows of it."""

    actor: Any
    name: str = ""
    node: str = ""
    job: _Job | None = None
    probing: bool = True  # not yet (or no longer) known to be alive: no work until ready() answers
    probe_at: float | None = None  # when to re-probe after Ray reported the actor unavailable
    retired: str | None = None  # why the slot is out of service for good

    @property
    def free(self) -> bool:
        return self.job is None and not self.probing and self.retired is None


class RayExecutor:
    """A pool of Ray actors, each holding one resident Worker.

    Args:
        factory: picklable zero-argument callable building the Worker inside each actor.
        workers: number of actors.
        address: ``None`` starts a local Ray for the run (reused if this process already has one);
            ``"auto"``, ``"HOST:PORT"`` or ``"ray://HOST:PORT"`` attaches to a running cluster.
        num_cpus: CPUs per worker (fractional allowed).
        num_gpus: GPUs per worker (fractional allowed).
        max_retries: re-runs of a trial whose worker process died before it is recorded failed.
        prefetch: trials :meth:`idle` takes beyond the idle actors, queued in the driver: an actor that finishes
            gets the next one while the driver is still recording results and sampling.
        env: environment variables for the worker processes (e.g. ``{"OMP_NUM_THREADS": "1"}``).
        startup_timeout: seconds to wait for every worker to build its Worker (model loading included).
        share: called once in the driver when Ray is up, returns the factory the actors get (e.g. one holding
            ObjectRefs of tensors shared through the object store, like ``worker.share_task_vectors``).

    Raises:
        ExecutionError: unreachable address, resources the cluster does not have, or a factory that fails in
            a worker (its one-line reason).
    """

    def __init__(
        self,
        factory: WorkerFactory,
        *,
        workers: int = 1,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_retries: int = 2,
        prefetch: int = 0,
        env: dict[str, str] | None = None,
        startup_timeout: float = 300.0,
        share: Callable[[WorkerFactory], WorkerFactory] | None = None,
    ) -> None:
        if workers < 1:
            raise ExecutionError(f"workers must be at least 1, got {workers}")
        if prefetch < 0:
            raise ExecutionError(f"prefetch must be at least 0, got {prefetch}")
        import ray

        self._factory = factory
        self._max_retries = max_retries
        self._prefetch = prefetch
        self._pending: deque[_Job] = deque()
        self._inflight: dict[Any, tuple[_Slot, _Job | None]] = {}  # ObjectRef -> (slot, job or None = probe)
        self._slots: list[_Slot] = []
        self._owns_ray = _connect(address, math.ceil(workers * num_cpus))
        try:
            _check_resources(workers, num_cpus, num_gpus)
            if share is not None:  # the actors' factory holds the refs; the driver keeps them alive with it
                factory = self._factory = share(factory)
            self._actor_class = ray.remote(_TrialActor).options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                max_restarts=-1,
                max_task_retries=0,  # we re-run lost trials ourselves: counted, and on any free actor
                max_concurrency=1,
                runtime_env={"env_vars": dict(env)} if env else None,
            )
            self._slots = [_Slot(self._actor_class.remote(factory)) for _ in range(workers)]
            self._start(startup_timeout)
        except BaseException:
            self.close()
            raise

    # -- Executor protocol -------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._slots)

    def idle(self) -> int:
        return max(0, sum(slot.free for slot in self._slots) + self._prefetch - len(self._pending))

    def submit(self, trial: int, plan: dict[str, Any]) -> None:
        self._pending.append(_Job(trial, plan, time.time()))
        self._dispatch()

    def completed(self, timeout: float | None = None) -> list[TrialResult]:
        """Results finished since the last call, in completion order; waits up to ``timeout`` s for one."""
        import ray

        deadline = None if timeout is None else time.monotonic() + timeout
        finished: list[tuple[float, TrialResult]] = []
        while True:
            self._dispatch()
            # Wake up for the deadline, or for the next re-probe of an actor Ray said was restarting.
            wakeups = [t for t in (deadline, *(s.probe_at for s in self._slots)) if t is not None]
            wait = max(0.0, min(wakeups) - time.monotonic()) if wakeups else None
            refs = list(self._inflight)
            if refs:
                done = ray.wait(refs, num_returns=1, timeout=wait)[0]
                if done:  # sweep up everything else already finished
                    done = ray.wait(refs, num_returns=len(refs), timeout=0)[0]
                finished.extend(item for item in map(self._collect, done) if item is not None)
            elif any(s.probe_at is not None for s in self._slots):
                time.sleep(wait or 0.0)
            else:  # nothing running and nothing to come back: fail what can never run, if anything
                finished.extend((time.time(), r) for r in self._fail_stranded())
                break
            if finished or (deadline is not None and time.monotonic() >= deadline):
                break
        self._dispatch()  # queued trials go to the actors just freed, before the caller records the results
        return [r for _, r in sorted(finished, key=lambda pair: pair[0])]

    def close(self) -> None:
        """Kill the actors; a Ray this executor started is shut down and every process it spawned is gone
        when this returns (``ray.shutdown`` leaves its agents to notice on their own, minutes later)."""
        import ray

        for slot in self._slots:
            with contextlib.suppress(Exception):  # already gone, or Ray already down
                ray.kill(slot.actor, no_restart=True)
        self._slots, self._inflight = [], {}
        self._pending.clear()
        if self._owns_ray:
            _shutdown_local_ray()
        self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- introspection (progress display, tests) -----------------------------------------------------------

    def running(self) -> dict[int, str]:
        """``{trial: worker id}`` of the trials being evaluated right now."""
        return {slot.job.trial: slot.name for slot in self._slots if slot.job is not None}

    def nodes(self) -> dict[str, str]:
        """``{worker id ("ip:pid"): Ray node id}`` of every live worker."""
        return {slot.name: slot.node for slot in self._slots if slot.retired is None}

    # -- internals ------------------------------------------------------------------------------------------

    def _start(self, timeout: float) -> None:
        """Wait for every actor's ready(); turn any failure into a one-line ExecutionError."""
        import ray

        refs = [slot.actor.ready.remote() for slot in self._slots]
        # short waits: a signal handler (Ctrl-C, SIGTERM) runs only when the main thread is back in Python
        deadline = time.monotonic() + timeout
        missing = refs
        while missing and time.monotonic() < deadline:
            missing = ray.wait(refs, num_returns=len(refs), timeout=min(0.5, max(0.0, deadline - time.monotonic())))[1]
        if missing:
            raise ExecutionError(
                f"{len(missing)} of {len(refs)} Ray workers not started after {timeout:g} s "
                "(cluster resources taken by other jobs?)"
            )
        for slot, ref in zip(self._slots, refs, strict=True):
            try:
                slot.name, slot.node, error = ray.get(ref)
            except Exception as exc:
                raise ExecutionError(f"Ray worker could not start: {one_line(exc)}") from exc
            if error is not None:
                raise ExecutionError(f"worker {slot.name} could not start: {error}")
            slot.probing = False

    def _dispatch(self) -> None:
        """Send queued trials to free actors; re-probe actors whose restart is due."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.probe_at is not None and slot.probe_at <= now:
                slot.probe_at = None
                self._inflight[slot.actor.ready.remote()] = (slot, None)
            if slot.free and self._pending:
                job = slot.job = self._pending.popleft()
                self._inflight[slot.actor.run.remote(job.trial, job.plan, job.submitted_at)] = (slot, job)

    def _collect(self, ref: Any) -> tuple[float, TrialResult] | None:
        """Take one finished ref: a result (with its end time), a probe answer, or a lost worker."""
        import ray
        from ray.exceptions import ActorDiedError, ObjectLostError, RayActorError

        slot, job = self._inflight.pop(ref)
        slot.job = None
        try:
            value = ray.get(ref)
        except (RayActorError, ObjectLostError) as exc:  # the process (or its node) died: re-run elsewhere
            slot.probing = True
            if job is not None:  # the process died under the trial: probe at once (answers once restarted)
                slot.probe_at = time.monotonic()
                return self._retry(slot, job, exc)
            if isinstance(exc, ActorDiedError):
                # Ray gave up on this actor: make sure it is gone (it holds resources), then replace it.
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=True)
                slot.actor = self._actor_class.remote(self._factory)
            slot.probe_at = time.monotonic() + PROBE_INTERVAL
            return None
        except Exception as exc:  # a Ray-side failure of one call (e.g. unpicklable result): fail that trial
            if job is None:
                slot.retired = one_line(exc)
                return None
            return time.time(), TrialResult(job.trial, None, one_line(exc), slot.name, attempts=job.attempts)
        if job is None:  # a probe answered: the actor is back (a new process after a restart)
            slot.name, slot.node, slot.retired = value
            slot.probing = False
            if slot.retired is not None:  # its factory failed this time (e.g. the node lost the models)
                ray.kill(slot.actor, no_restart=True)
            return None
        value.attempts = job.attempts
        return job.submitted_at + value.timings.get("total", 0.0), value

    def _retry(self, slot: _Slot, job: _Job, exc: Exception) -> tuple[float, TrialResult] | None:
        """Re-queue a trial whose worker died under it, or fail it once its retries are spent."""
        if job.attempts > self._max_retries:
            tries = f"attempt {job.attempts} of {self._max_retries + 1}"
            reason = f"worker {slot.name} died running the trial ({tries}): {one_line(exc)}"
            return time.time(), TrialResult(job.trial, None, reason, slot.name, attempts=job.attempts)
        job.attempts += 1
        self._pending.appendleft(job)
        return None

    def _fail_stranded(self) -> list[TrialResult]:
        """With every worker retired, queued trials can never run: fail them with the workers' reason."""
        if not self._pending or any(slot.retired is None for slot in self._slots):
            return []
        reason = f"no worker left: {self._slots[0].retired}" if self._slots else "no worker left"
        failed = [TrialResult(job.trial, None, reason, attempts=job.attempts) for job in self._pending]
        self._pending.clear()
        return failed


def _connect(address: str | None, num_cpus: int) -> bool:
    """Start or attach to Ray; returns whether this executor did so (and must shut it down)."""
    import ray

    if address not in (None, "auto"):
        _check_reachable(address)
    if ray.is_initialized():  # the caller's own Ray session: use it, leave it running
        return False
    from mergesearch.execution.stop import restore_after

    if address is None:
        _adopt_orphans()
        try:
            # "local" always starts a fresh instance, never a leftover cluster named in /tmp/ray.
            restore_after(lambda: ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
            ))
        except Exception as exc:
            _shutdown_local_ray()
            raise ExecutionError(f"cannot start a local Ray instance: {one_line(exc)}") from exc
        except BaseException:  # Ctrl-C / SIGTERM while Ray starts: what started must not outlive the driver
            _shutdown_local_ray()
            raise
        return True
    try:
        restore_after(lambda: ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False))
    except Exception as exc:
        raise ExecutionError(f"cannot attach to the Ray cluster at {address!r}: {one_line(exc)}") from exc
    except BaseException:
        if ray.is_initialized():
            ray.shutdown()
        raise
    return True


def _adopt_orphans() -> None:
    """Make this process the Linux "child subreaper" of what it spawns: Ray's agents are the raylet's
    children, and when ``ray.shutdown`` kills the raylet first they would be re-parented to init, out of
    reach of :func:`_shutdown_local_ray`'s scan (seen as agents alive after the driver exited)."""
    if sys.platform != "linux":
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # 36 = PR_SET_CHILD_SUBREAPER


def _ray_descendants() -> list[Any]:
    """This process's descendant processes that belong to Ray (raylet, GCS, agents, workers)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "ray" in " ".join(p.cmdline()[:3]).lower() or "ray" in p.name().lower():
                out.append(p)
    return out


def _shutdown_local_ray(grace: float = 3.0) -> None:
    """``ray.shutdown()``, then terminate (after ``grace`` seconds: kill) any Ray process this driver spawned
    that is still alive."""
    import psutil
    import ray

    procs = _ray_descendants()
    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()
    for _ in range(3):  # again: agents the raylet started late, re-parented to us (see _adopt_orphans)
        procs = [p for p in {*procs, *_ray_descendants()} if p.is_running()]
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)
        procs = []


def _check_reachable(address: str) -> None:
    """Fail fast on a dead HOST:PORT (``ray.init`` to it can hang for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutionError(f"Ray address must be 'auto', 'HOST:PORT' or 'ray://HOST:PORT', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ExecutionError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}") from exc


def _check_resources(workers: int, num_cpus: float, num_gpus: float) -> None:
    """Refuse per-worker resources no node has, or a pool larger than the cluster (actors would wait forever)."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for key, need in (("CPU", num_cpus), ("GPU", num_gpus)):
        if need <= 0:
            continue
        largest = max((res.get(key, 0.0) for res in nodes), default=0.0)
        total = sum(res.get(key, 0.0) for res in nodes)
        if need > largest:
            raise ExecutionError(f"num_{key.lower()}s={need:g} per worker, but the largest Ray node has {largest:g}")
        if need * workers > total:
            raise ExecutionError(
                f"{workers} workers × num_{key.lower()}s={need:g} need {need * workers:g} {key}s, "
                f"but the Ray cluster has {total:g}"
            )
