"""Run the CLI in-process as a user would: the exit code and what it printed."""

from __future__ import annotations

from typing import Any


def run_cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """``mergesearch ARGV``: (exit code, stdout, stderr) of this call alone (earlier output is dropped)."""
    from mergesearch.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err
