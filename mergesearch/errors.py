"""Exception types for user-facing errors.

Every error a user can cause (a bad config, a missing model, a malformed data file, a study that does not
match) is a :class:`MergeSearchError`. The CLI prints its message as one line and exits non-zero; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MergeSearchError(Exception):
    """Base class of all user-facing errors; the message names the culprit (file, key, tensor, line)."""

    exit_code = 1


class ConfigError(MergeSearchError):
    """Invalid job or merge configuration (YAML syntax, unknown keys, wrong types or ranges)."""

    exit_code = 2


class ModelError(MergeSearchError):
    """A checkpoint that cannot be loaded or does not match the base model."""


class DataError(MergeSearchError):
    """A dataset file that is missing, malformed or empty."""


class StudyError(MergeSearchError):
    """A study storage that cannot be opened, or a study that does not match the config."""


class ExecutionError(MergeSearchError):
    """Workers that cannot be started or reached (Ray address, resources, model paths on a node)."""


class TrialError(MergeSearchError):
    """A candidate whose evaluation failed (NaN score, bad plan); the trial is stored as failed."""


class NonFiniteError(TrialError):
    """A merge whose result holds NaN or ±inf (e.g. weights that overflow the dtype); names tensor and method."""
