"""mergesearch: multi-objective search over merge recipes for fine-tuned transformer models."""

from __future__ import annotations

__version__ = "0.1.0"
