"""Response cache: successful completions keyed by sha256(endpoint, model, extra request fields, messages, sampling
params), in SQLite. The endpoint (base URL) is part of the key because one model name on two servers (two vLLM
deployments, a proxy and the upstream) need not be the same model; extra_body (vLLM's guided decoding, a reasoning
switch, …) changes what comes back.

One file shared by every process on the machine (WAL mode + busy timeout make concurrent writers safe).
Default path `~/.cache/autointerp/llm_cache.sqlite` (under $AUTOINTERP_CACHE when set, like every other cache); the
env var AUTOINTERP_LLM_CACHE overrides it, and
AUTOINTERP_LLM_CACHE=off (or "", "0", "none") disables caching.

Sampling with temperature > 0 and no seed is not cached: each call is meant to differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from .base import ChatMessage, Completion, SamplingParams, TokenLogprob, Usage

DEFAULT_CACHE_PATH = Path("~/.cache/autointerp/llm_cache.sqlite")
CACHE_ENV = "AUTOINTERP_LLM_CACHE"
_OFF = {"", "0", "off", "none", "false", "no"}
_KEY_VERSION = 2  # bump when the key or the stored value layout changes (2: endpoint and extra_body)

DEFAULT = "default"  # sentinel for make_client(cache_path=...)


def resolve_cache_path(cache_path: str | Path | None = DEFAULT) -> Path | None:
    """DEFAULT -> env var or the default path; None -> no cache; a path -> that path."""
    if cache_path is None:
        return None
    if isinstance(cache_path, str) and cache_path == DEFAULT:
        env = os.environ.get(CACHE_ENV)
        if env is not None:
            return None if env.strip().lower() in _OFF else Path(env).expanduser()
        from ..paths import cache_root

        return cache_root().expanduser() / DEFAULT_CACHE_PATH.name
    return Path(cache_path).expanduser()


def cache_key(model: str, messages: list[ChatMessage], params: SamplingParams, *, endpoint: str | None = None,
              extra_body: dict | None = None) -> str:
    """`endpoint`: where the model is served (the base URL; None for in-process backends); `extra_body`: request
    fields beyond the sampling params."""
    payload = {
        "v": _KEY_VERSION,
        "endpoint": endpoint,
        "model": model,
        "extra_body": extra_body or {},
        "messages": [[m.role, m.content] for m in messages],
        "params": params.as_dict(),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cacheable(params: SamplingParams) -> bool:
    return params.temperature == 0 or params.seed is not None


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from the event loop and worker threads
        self._conn: sqlite3.Connection | None = self._connect()  # now: a bad path fails at construction

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS responses ("
            " key TEXT PRIMARY KEY, model TEXT NOT NULL, value TEXT NOT NULL, created REAL NOT NULL)"
        )
        return db

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection, reopened after close(): a client closed at the end of one event loop may serve another."""
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        v = json.loads(row[0])
        lps = v.get("logprobs")
        return Completion(
            text=v["text"],
            model=v["model"],
            logprobs=None if lps is None else [TokenLogprob(t, lp, dict(top)) for t, lp, top in lps],
            cached=True,
            # The re-run pays nothing; what the answer cost first is kept in the cached_* fields.
            usage=Usage(
                cached_calls=1,
                cached_prompt_tokens=v["prompt_tokens"],
                cached_completion_tokens=v["completion_tokens"],
            ),
        )

    def put(self, key: str, c: Completion) -> None:
        value = {
            "text": c.text,
            "model": c.model,
            "logprobs": None if c.logprobs is None else [[t.token, t.logprob, t.top] for t in c.logprobs],
            "prompt_tokens": c.usage.prompt_tokens,
            "completion_tokens": c.usage.completion_tokens,
        }
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, model, value, created) VALUES (?, ?, ?, ?)",
                (key, c.model, json.dumps(value, ensure_ascii=False), time.time()),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM responses")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
