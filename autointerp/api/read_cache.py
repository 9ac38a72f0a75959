"""A response cache for the read queries over a whole store, SQLite only: the API's search, latents list and
dictionary detail, and the pages built from the same queries (home, a dictionary's page, a latent's page, search).

Their answers depend on many rows (every explanation a search matches, a page of latents and their best scores), so
no per-row version is cheap to read, as the GET-latent fast path reads one (fast.py). SQLite gives a store-wide one:
`PRAGMA data_version` on a connection of our own changes whenever any other connection — this process's engine, a
worker, another server process — commits a write. Before a request runs, the version is read; a body stored under
the same version and the same path and query string is served as it was; otherwise the route answers and its body
(200, JSON) is kept under the version read *before* it ran, so a write landing meanwhile makes the next request
miss, never serve stale data. Any write invalidates every body: while jobs write, requests simply run; on a store
that is being read (browsing, a finished job's results) popular queries cost one PRAGMA.

Not cached: other methods and paths, non-200 answers, stores that need a read key (the key decides the answer), and
PostgreSQL (no store-wide counter: its reads run every time). The pages use nothing of the request but its path and
query string (no host, cookie or header reaches a template), so one body serves every client.
"""

from __future__ import annotations

import re
import sqlite3
import threading

from .fast import BodyCache

# the read endpoints whose answers are a function of the store's rows and the query string alone
PATHS = re.compile(r"^(/api/v1/(search|dictionaries/[^/]+(/latents)?)|/|/search|/d/[^/]+(/[0-9]+)?)$")
TYPES = (b"application/json", b"text/html")


class StoreVersion:
    """`PRAGMA data_version` of a SQLite file on a connection of our own (autocommit: no snapshot is held)."""

    def __init__(self, path: str):
        self.path, self.lock, self.conn = path, threading.Lock(), None

    def __call__(self) -> int:
        with self.lock:
            if self.conn is None:
                self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            return int(self.conn.execute("PRAGMA data_version").fetchone()[0])


class ReadCache:
    """Pure ASGI middleware (see the module docstring)."""

    def __init__(self, app, state):
        self.app, self.settings = app, state.settings
        store, max_bytes = state.store, int(state.settings.read_cache_mb * (1 << 20))
        path = store.engine.url.database if store.dialect == "sqlite" else None
        self.on = bool(path) and path != ":memory:" and max_bytes > 0
        self.version = StoreVersion(path) if self.on else None
        self.bodies = BodyCache(max_bytes)
        self.hits = self.misses = 0  # for tests and benchmarks
        state.read_cache = self

    async def __call__(self, scope, receive, send):
        if not (self.on and scope["type"] == "http" and scope["method"] == "GET" and PATHS.match(scope["path"])
                and not self.settings.read_key_required):
            return await self.app(scope, receive, send)
        key = (scope["path"], scope.get("query_string", b""))
        version = str(self.version())
        hit = self.bodies.get(key, version)
        if hit is not None:
            self.hits += 1
            _, headers, body = hit
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.misses += 1
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body") and start.get("status") == 200:
                    headers = list(start.get("headers", []))
                    if any(k == b"content-type" and v.startswith(TYPES) for k, v in headers):
                        self.bodies.put(key, version, headers, b"".join(chunks))
            await send(message)

        await self.app(scope, receive, capture)
