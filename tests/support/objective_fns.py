"""Objective functions for `type: python` objectives in tests (imported by workers via PYTHONPATH)."""

from __future__ import annotations

import math
import time


def slow_norm(model, tokenizer, examples) -> float:
    """Sleeps a little (so a run can be killed mid-trial) and returns the lm_head weight norm."""
    time.sleep(0.25)
    return float(model.lm_head.weight.norm())


def nan_for_heavy(model, tokenizer, examples) -> float:
    """NaN when the merged embedding is far from zero (some plans), else its norm: a failing candidate."""
    norm = float(model.get_input_embeddings().weight.norm())
    return math.nan if norm > nan_for_heavy.threshold else norm


nan_for_heavy.threshold = math.inf
