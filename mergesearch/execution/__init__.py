"""Executors: where candidate merges are applied and scored (in-process, or on Ray actors)."""
