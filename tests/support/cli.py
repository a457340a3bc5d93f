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


def run_study(job: Any, url: str, trials: int, capsys: Any, study: str = "t") -> list[Any]:
    """``mergesearch run JOB`` for ``trials`` trials into study ``study`` at ``url``; checks it exits 0 with every
    trial COMPLETE and returns the stored trials."""
    import optuna

    code, _, err = run_cli(["run", str(job), "--storage", url, "--study", study, "--trials", str(trials),
                            "--no-progress"], capsys)
    assert code == 0, err
    stored = optuna.load_study(study_name=study, storage=url).trials
    assert [t.state.name for t in stored] == ["COMPLETE"] * trials
    return stored
