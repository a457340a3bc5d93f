"""What is searched: merge methods, per-model weights and densities per layer group, layer choices.

``build_space(job.space, ...)`` validates a job's ``space:`` section and returns a :class:`MergeSpace` that
maps optimizer parameters to a :class:`~mergesearch.merging.plan.MergePlan` (``decode``) and to the unit cube
(``to_unit`` / ``from_unit``).
"""

from __future__ import annotations

from mergesearch.spaces.space import MergeSpace, build_space, num_layers_of

__all__ = ["MergeSpace", "build_space", "num_layers_of"]
