"""Reading task data: JSONL examples and plain text, with one-line errors and deterministic subsets."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesearch.errors import ConfigError, DataError

if TYPE_CHECKING:
    from mergesearch.config import ObjectiveConfig
    from mergesearch.objectives.base import ObjectiveContext

#: a required field, or a tuple of alternatives of which one must be present (e.g. ``("prompt", "query")``).
Field = str | tuple[str, ...]


def data_path(config: ObjectiveConfig, context: ObjectiveContext) -> Path:
    """The file an objective reads for the context's split (``data`` for search, ``test`` for test)."""
    key = "data" if context.split == "search" else "test"
    path = getattr(config, key)
    if path is None:
        raise ConfigError(f"objective '{config.label}': needs a '{key}' file for the {context.split} split")
    return Path(path)


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")


def read_jsonl(path: Path, fields: Sequence[Field] = ()) -> list[dict[str, Any]]:
    """All examples of a JSONL file (blank lines skipped), each checked for the required fields.

    Args:
        path: the file.
        fields: keys every line must have; a tuple means any one of them.

    Returns:
        The examples in file order, each with its 1-based line number under ``"_line"``.

    Raises:
        DataError: missing file, malformed JSON (names the line), a missing field (names line and field),
            or no examples.
    """
    _check_file(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(ex, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(ex).__name__}")
            for field in fields:
                alternatives = (field,) if isinstance(field, str) else field
                if not any(k in ex for k in alternatives):
                    raise DataError(f"{path}:{lineno}: missing field '{'|'.join(alternatives)}'")
            ex["_line"] = lineno
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no examples (empty dataset)")
    return examples


def read_texts(path: Path) -> list[str]:
    """Texts for perplexity: a ``.txt`` file is one text; a JSONL file gives each line's ``text``."""
    if path.suffix == ".txt":
        _check_file(path)
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: no text (empty dataset)")
        return [text]
    return [_as_str(ex, "text", path) for ex in read_jsonl(path, ["text"])]


def subset(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices of a deterministic subset: the same ``limit`` of ``n`` examples in every call and process.

    The indices come in a seeded random order (Python's ``random.Random`` is stable across platforms and
    versions), also without a limit: fidelity rungs score prefixes of this order, so every prefix is a random
    sample of the data (a file sorted by topic or difficulty would bias a plain head), and the prefixes nest.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order if limit is None else order[:limit]


def load_examples(config: ObjectiveConfig, context: ObjectiveContext, fields: Sequence[Field]) -> list[dict]:
    """Read the split's JSONL file and take the config's deterministic subset (``limit``, ``seed``)."""
    examples = read_jsonl(data_path(config, context), fields)
    return [examples[i] for i in subset(len(examples), config.limit, config.seed)]


def _as_str(ex: dict[str, Any], key: str, path: Path | str) -> str:
    value = ex[key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{ex.get('_line', '?')}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def field_str(ex: dict[str, Any], keys: Sequence[str], path: Path | str) -> str:
    """The first present of ``keys`` as a string (a DataError naming the line if it is not one)."""
    key = next(k for k in keys if k in ex)
    return _as_str(ex, key, path)
