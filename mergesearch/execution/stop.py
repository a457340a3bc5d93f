"""Stopping a run from outside: SIGTERM (``kill``, ``ray job stop``, a scheduler's timeout) behaves like Ctrl-C.

:func:`sigterm_as_interrupt` makes SIGTERM raise :class:`Terminated` (a ``KeyboardInterrupt``) in the main
thread, so every ``except KeyboardInterrupt`` / ``finally`` that makes Ctrl-C clean (in-flight trials
re-queued, workers and Ray shut down) serves SIGTERM too; the CLI exits 143 (128 + 15) instead of 130. Only
the first signal raises: one sent again while the run cleans up is noted and ignored, so the clean-up is never
cut short (a second interrupt in the middle of it would leave trials RUNNING).

Libraries replace the handler: ``ray.init`` installs its own (``sys.exit(15)``) and Ray's core worker may
install a C-level one. :func:`restore_after` puts ours back once such a call returns.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM: stop as on Ctrl-C."""


#: exit status of a run stopped by SIGTERM (the shell's 128 + signal number)
EXIT_TERMINATED = 128 + signal.SIGTERM


class _Handler:
    """SIGTERM handler raising :class:`Terminated` once; later signals only count."""

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum: int, frame: Any) -> None:
        self.received += 1
        if self.received == 1:
            raise Terminated()


_active: _Handler | None = None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block (main thread only; elsewhere a no-op), SIGTERM raises :class:`Terminated` once."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = _Handler()
    previous = signal.signal(signal.SIGTERM, handler)
    _active = handler
    try:
        yield
    finally:
        _active = None
        signal.signal(signal.SIGTERM, previous)


def received() -> bool:
    """Whether SIGTERM arrived since :func:`sigterm_as_interrupt` was entered."""
    return _active is not None and _active.received > 0


def restore_after(call: Callable[[], Any]) -> Any:
    """Run ``call`` (e.g. ``ray.init``), then put back the SIGTERM handler it replaced, if ours was active.

    A SIGTERM that the library's own handler turned into ``SystemExit(15)`` during the call becomes
    :class:`Terminated`, as if ours had caught it.
    """
    if _active is None or threading.current_thread() is not threading.main_thread():
        return call()
    handler = _active
    try:
        return call()
    except SystemExit as e:
        if e.code == signal.SIGTERM:
            handler.received += 1
            raise Terminated() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, handler)
