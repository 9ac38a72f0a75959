"""Where autointerp keeps its files: one cache root (store, demo model and dictionaries, LLM response cache, indexes).
A module of its own so that the store and the LLM cache find it without importing torch (hf_loading does)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$AUTOINTERP_CACHE, else ~/.cache/autointerp."""
    return Path(os.environ.get("AUTOINTERP_CACHE", Path.home() / ".cache" / "autointerp"))
