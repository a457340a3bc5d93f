"""Shared fixtures: tiny random models (milliseconds) for arithmetic and plumbing tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two threads fighting over two busy cores ran 30x slower here; tests are small, one thread is fastest.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TASKS = ("<reverse>", "<swap>", "<sort>")


def make_tiny_llama(path: Path, seed: int, *, layers: int = 2, hidden: int = 32, base: Path | None = None,
                    noise: float = 0.02) -> Path:
    """Save a random tiny Llama with the demo tokenizer at ``path``.

    With ``base``, the model is the base's weights plus Gaussian noise of std ``noise`` (a fake expert
    whose task vector is that noise).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mergesearch.demo.tokenizer import build_tokenizer

    tok = build_tokenizer(TASKS)
    torch.manual_seed(seed)
    if base is None:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=32, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A random base and three noisy 'experts' of it: ``{"base": dir, "a": dir, "b": dir, "c": dir}``."""
    root = tmp_path_factory.mktemp("tiny")
    base = make_tiny_llama(root / "base", seed=0)
    out = {"base": base}
    for i, name in enumerate("abc"):
        out[name] = make_tiny_llama(root / name, seed=i + 1, base=base)
    return out


def write_job(root: Path, models: dict[str, Path], *, objectives: str | None = None, extra: str = "") -> Path:
    """Write a small job YAML (and its JSONL data) over ``models`` into ``root``; returns the YAML path."""
    import json
    import random

    rng = random.Random(0)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for task, fn in (("reverse", lambda d: d[::-1]), ("sort", sorted)):
        for split, n in (("search", 8), ("test", 8)):
            with open(data / f"{task}_{split}.jsonl", "w") as f:
                for _ in range(n):
                    digits = [str(rng.randrange(10)) for _ in range(4)]
                    f.write(json.dumps({"prompt": f"<{task}> {' '.join(digits)} =",
                                        "answer": " ".join(fn(digits))}) + "\n")
    objectives = objectives or (
        "  - {type: exact_match, name: reverse, data: data/reverse_search.jsonl, test: data/reverse_test.jsonl}\n"
        "  - {type: loglik, name: sort_ll, data: data/sort_search.jsonl, test: data/sort_test.jsonl}\n"
        "  - {type: l1_from_base, name: l1}\n"
    )
    text = (
        f"base_model: {models['base']}\n"
        f"models: [{models['a']}, {models['b']}]\n"
        "space: {methods: [task_arithmetic, ties], weight: [0, 1], density: [0.2, 1]}\n"
        f"objectives:\n{objectives}"
        "search: {optimizer: random, trials: 4, seed: 0}\n"
        "execution: {executor: local, workers: 1}\n" + extra
    )
    path = root / "job.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_job(tiny_models, tmp_path) -> Path:
    """A job YAML over the tiny models with two task objectives and one cost, local executor."""
    return write_job(tmp_path, tiny_models)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server on 127.0.0.1 for this test session (``tests/support/postgres.py``), stopped and
    deleted afterwards. Skips when PostgreSQL or psycopg is missing; fails instead under
    ``MERGESEARCH_REQUIRE_POSTGRES=1`` (``.ci/run``), so CI really runs the PostgreSQL tests."""
    from tests.support.postgres import PostgresServer, required, unavailable

    reason = unavailable()
    if reason:
        if required():
            pytest.fail(f"MERGESEARCH_REQUIRE_POSTGRES is set but {reason}", pytrace=False)
        pytest.skip(reason)
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server, monkeypatch) -> str:
    """A fresh, empty database on the session's PostgreSQL server: ``postgresql://USER@127.0.0.1:PORT/tN``.
    The password is in ``PGPASSWORD`` (set for this test and inherited by the processes it starts)."""
    monkeypatch.setenv("PGPASSWORD", postgres_server.password)
    return postgres_server.url(postgres_server.create_database())
