"""How many threads a merge's compiled passes may use: torch's intra-op count, unless the running thread is one of
a job-parallel merge's workers, which merge whole tensors side by side on one thread each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCAL = threading.local()


def kernel_threads() -> int:
    """Threads for the compiled pass about to run on this thread."""
    return getattr(_LOCAL, "threads", None) or torch.get_num_threads()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Within the block, this thread's compiled passes run on it alone (a job-parallel merge's worker)."""
    before = getattr(_LOCAL, "threads", None)
    _LOCAL.threads = 1
    try:
        yield
    finally:
        _LOCAL.threads = before
