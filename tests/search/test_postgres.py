"""A real PostgreSQL server (session fixture ``postgres_server``, tests/support/postgres.py): a driver killed with
SIGKILL and resumed, and a second driver refused by the lease, on PostgreSQL rather than SQLite. Skipped when
PostgreSQL or psycopg is missing here; ``.ci/run`` sets ``MERGESEARCH_REQUIRE_POSTGRES=1`` so CI fails instead."""

from __future__ import annotations

import os
import sys

import optuna
import pytest

from tests.test_bad_inputs import cli
from tests.test_faults import kill_resume_and_second_driver


@pytest.mark.slow
def test_sigkill_resume_and_second_driver_refused_on_postgres(postgres_server, postgres_url, tiny_models,
                                                               tmp_path, capsys) -> None:
    assert postgres_url.startswith("postgresql://") and ":" not in postgres_url.split("://")[1].split("@")[0]
    assert os.environ["PGPASSWORD"] == postgres_server.password  # the password travels in the environment only
    # The test polls through one storage: a fresh one per poll would open a connection each time. Creating it
    # first also creates Optuna's tables before the driver starts.
    poll = optuna.storages.RDBStorage(postgres_url)
    try:
        kill_resume_and_second_driver(tiny_models, tmp_path, capsys, postgres_url, kills=1, target=4, poll=poll,
                                      resume_in_process=True)  # one interpreter start-up less: < 60 s
    finally:
        poll.engine.dispose()
    # the other URL form reads the same study
    db = postgres_url.rsplit("/", 1)[1]
    code, err = cli(["front", "--storage", postgres_server.url(db, driver="psycopg"), "--study", "k"], capsys)
    assert code == 0, err


def test_missing_psycopg_names_the_extra(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    for url in ("postgresql://user@127.0.0.1:1/db", "postgresql+psycopg://user:s3cret@127.0.0.1:1/db"):
        code, err = cli(["front", "--storage", url, "--study", "s"], capsys)
        assert code != 0 and len(err) == 1, err
        assert 'pip install "mergesearch[postgres]"' in err[0] and "s3cret" not in err[0], err
