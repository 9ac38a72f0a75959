"""The fast path of GET /api/v1/dictionaries/{ref}/latents/{index}: a serialised answer per (dictionary, latent,
n_top), checked against the store on every request and served as bytes without FastAPI's per-request work.

Freshness: before each answer one small query reads the latent's *version* — its statistics row, its dictionary's
row, and the count and largest id of its explanations and of their scores (explanations and scores are only ever
inserted, with growing ids, so any write another process makes to this latent changes the version). A cached body is
served only when its version equals the store's current one. A body is built *after* its version is read, so it is
never older than the version it is stored under: a write landing in between makes the next request miss, never
serve stale data. The version also gives the ETag (If-None-Match: 304). Not versioned: the files of the extraction
cache (examples), written once per extraction; a re-extraction into the same folder that left every statistic and
the dictionary row unchanged would show its new examples after a restart, as runtime.py's opened caches already do.

Everything unusual (other query parameters, read keys required, an unknown dictionary or latent, an error) is handed
to the FastAPI route itself, so errors and validation read exactly as everywhere else in the API.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict

from sqlalchemy import Integer, and_, bindparam, distinct, func, select, true
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match, Route

from ..store.store import T_DICT, T_EXPL, T_LATENT, T_SCORE

log = logging.getLogger(__name__)
PATH = "/dictionaries/{ref}/latents/{index}"
N_TOP_DEFAULT, N_TOP_MAX = 20, 100
FULL = "autointerp.full_route"  # scope key: the fast path declined, the FastAPI route answers


def _version_query(d, i):
    agg = (select(func.count(distinct(T_EXPL.c.id)).label("n_expl"), func.max(T_EXPL.c.id).label("max_expl"),
                  func.count(T_SCORE.c.id).label("n_score"), func.max(T_SCORE.c.id).label("max_score"))
           .select_from(T_EXPL.outerjoin(T_SCORE, T_SCORE.c.explanation_id == T_EXPL.c.id))
           .where(T_EXPL.c.dictionary_pk == d, T_EXPL.c.latent == i).subquery())
    lat = [c for c in T_LATENT.c if c.name not in ("dictionary_pk", "index")]
    return (select(*lat, *[c.label(f"d_{c.name}") for c in T_DICT.c], *agg.c)
            .select_from(T_LATENT.join(T_DICT, T_DICT.c.id == T_LATENT.c.dictionary_pk).join(agg, true()))
            .where(and_(T_LATENT.c.dictionary_pk == d, T_LATENT.c.index == i)))


class RawQueries:
    """The fast path's queries on a DBAPI connection of its own, kept for this process: SQLAlchemy's per-statement
    work (pool checkout, BEGIN/COMMIT, result rows) cost several times the queries themselves. Each statement is
    built and compiled by SQLAlchemy once (values bound, never formatted in), and its columns go through the
    dialect's own result processors (JSON, booleans, datetimes), so rows read as the store's queries read them.
    Autocommit: every statement sees the latest committed writes, and no read transaction stays open (one would hold
    back SQLite's WAL checkpoints). The connection is one of the engine's (SQLite pragmas, dialect hooks applied),
    detached from its pool, and queried on the event loop: one indexed lookup, cheaper than a thread hop (an
    asynchronous psycopg connection measured no better on PostgreSQL)."""

    def __init__(self, store):
        self.store = store
        self.lock = threading.Lock()
        self.conn = None
        dialect = store.engine.dialect
        self.positional = dialect.positional
        self.pg = store.dialect == "postgresql"
        d, i = bindparam("d", type_=Integer), bindparam("i", type_=Integer)
        self.stmts = {}
        for name, stmt in {
            "version": _version_query(d, i),
            # one round trip: each explanation once per score (or once, unscored), scores in (scorer, id) order
            "explanations": select(*T_EXPL.c, *[c.label(f"s_{c.name}") for c in T_SCORE.c])
                            .select_from(T_EXPL.outerjoin(T_SCORE, T_SCORE.c.explanation_id == T_EXPL.c.id))
                            .where(T_EXPL.c.dictionary_pk == d, T_EXPL.c.latent == i)
                            .order_by(T_EXPL.c.id, T_SCORE.c.scorer, T_SCORE.c.id),
        }.items():
            compiled = stmt.compile(dialect=dialect)
            cols = list(stmt.selected_columns)
            self.stmts[name] = (str(compiled), list(compiled.positiontup or []), [c.key for c in cols],
                                [c.type.dialect_impl(dialect) for c in cols])
        self.procs: dict[str, list] = {}

    def _connect(self):
        raw = self.store.engine.raw_connection()  # set up by the engine (SQLite pragmas, dialect hooks)
        raw.detach()  # ours for good: closed by us, never handed back to the pool
        if self.pg:
            raw.dbapi_connection.autocommit = True
        return raw.dbapi_connection

    def _args(self, name: str, pk: int, index: int):
        sql, order, _, _ = self.stmts[name]
        params = {"d": pk, "i": index}
        return sql, ([params[k] for k in order] if self.positional else params)

    def _procs(self, name: str, description) -> list:
        procs = self.procs.get(name)
        if procs is None:  # some need the driver's column type (PostgreSQL numerics)
            dialect = self.store.engine.dialect
            procs = self.procs[name] = [t.result_processor(dialect, desc[1])
                                        for t, desc in zip(self.stmts[name][3], description)]
        return procs

    def raw(self, name: str, pk: int, index: int) -> tuple[list, list, list[tuple]]:
        """(column names, their result processors, the driver's rows)."""
        sql, args = self._args(name, pk, index)
        with self.lock:
            for attempt in (0, 1):
                try:
                    if self.conn is None:
                        self.conn = self._connect()
                    cur = self.conn.cursor()
                    try:
                        cur.execute(sql, args)
                        rows = cur.fetchall()  # drained: the statement (and its snapshot) ends here
                        return self.stmts[name][2], self._procs(name, cur.description), rows
                    finally:
                        cur.close()
                except Exception:
                    self.close()  # a dropped connection: one fresh try
                    if attempt:
                        raise

    def rows(self, name: str, pk: int, index: int) -> list[dict]:
        keys, procs, raw = self.raw(name, pk, index)
        return [self.processed(keys, procs, r) for r in raw]

    @staticmethod
    def processed(keys, procs, r) -> dict:
        return {k: (v if p is None or v is None else p(v)) for k, p, v in zip(keys, procs, r)}

    def version(self, pk: int, index: int) -> tuple[str, object] | None:
        """(the latent's version: its driver values as text, a callable giving them as {column: value}), or None
        when the latent has no statistics row. Compared as the driver returns them: nothing decoded on a hit."""
        keys, procs, raw = self.raw("version", pk, index)
        if not raw:
            return None
        return repr(raw[0]), lambda: self.processed(keys, procs, raw[0])

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 — already broken
                pass


BASELINES = ("random", "token_frequency")


def explanations(q: RawQueries, pk: int, index: int) -> list[dict]:
    """Every explanation of the latent with its scores, shaped and ordered as store.queries.latent_explanations
    (best LLM explanations first; a test holds the two equal)."""
    by: dict[int, dict] = {}
    for r in q.rows("explanations", pk, index):
        e = by.get(r["id"])
        if e is None:
            e = by[r["id"]] = {k: v for k, v in r.items() if not k.startswith("s_")}
            e["scores"] = []
        if r["s_id"] is not None:
            e["scores"].append({k[2:]: v for k, v in r.items() if k.startswith("s_")})
    ex = list(by.values())
    for e in ex:
        vals = [s["value"] for s in e["scores"] if s["value"] is not None]
        e["mean_score"] = sum(vals) / len(vals) if vals else None
        e["total_cost_usd"] = float(e["cost_usd"] or 0) + sum(float(s["cost_usd"] or 0) for s in e["scores"])
    ex.sort(key=lambda e: (e["text"] is None, e["explainer"] in BASELINES, -(e["mean_score"] or -1.0), e["id"]))
    return ex


class BodyCache:
    """(dictionary pk, latent, n_top) -> (version, etag, body); least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, version: str):
        with self.lock:
            hit = self.items.get(key)
            if hit is None or hit[0] != version:
                return None
            self.items.move_to_end(key)
            return hit

    def put(self, key, version: str, etag: bytes, body: bytes) -> None:
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.bytes -= len(old[2])
            if len(body) > self.max_bytes // 4:
                return
            self.items[key] = (version, etag, body)
            self.bytes += len(body)
            while self.bytes > self.max_bytes:
                _, (_, _, b) = self.items.popitem(last=False)
                self.bytes -= len(b)


def _n_top(query: bytes) -> int | None:
    """n_top from a query string that holds nothing else, or None (left to the full route)."""
    if not query:
        return N_TOP_DEFAULT
    name, sep, value = query.partition(b"=")
    if name != b"n_top" or not sep or not value.isdigit() or len(value) > 3:
        return None
    n = int(value)
    return n if n <= N_TOP_MAX else None


class FastLatent:
    """ASGI endpoint placed before the FastAPI route of the same path (which stays in the OpenAPI contract and
    answers whatever this one hands on)."""

    def __init__(self, app):
        self.app = app
        self.cache = BodyCache(int(app.state.settings.latent_cache_mb * (1 << 20)))
        self.queries = None
        self.hits = self.misses = 0  # for tests and benchmarks

    async def __call__(self, scope, receive, send):
        out = None
        if scope["method"] == "GET" and not self.app.state.settings.read_key_required:
            try:
                out = await self._answer(scope)
            except Exception:  # noqa: BLE001 — the full route answers (and reports) it
                log.debug("fast latent path declined", exc_info=True)
                out = None
        if out is None:  # routed again, past this route (FastRoute.matches), to the FastAPI route
            return await self.app.router({**scope, FULL: True}, receive, send)
        status, headers, body = out
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope):
        from fastapi import HTTPException

        from . import runtime
        from .routes import latent_detail, lookup_dictionary, render_json

        p = scope["path_params"]
        raw_index = p["index"]
        n_top = _n_top(scope.get("query_string", b""))
        if n_top is None or not raw_index.isdigit() or len(raw_index) > 10 or int(raw_index) > 2 ** 31:
            return None
        index = int(raw_index)
        store = self.app.state.store
        try:
            d = lookup_dictionary(store, p["ref"])
        except HTTPException:
            return None
        if self.queries is None:
            self.queries = RawQueries(store)
        q = self.queries
        got = q.version(d["id"], index)  # read before the body is built (the module's docstring says why)
        if got is None or index >= d["n_latents"]:
            return None
        version, values = got
        key = (d["id"], index, n_top)
        hit = self.cache.get(key, version)
        if hit is not None:
            self.hits += 1
            _, etag, body = hit
        else:
            self.misses += 1
            # the dictionary and statistics as of this version (the 5 s lookup cache could be older)
            v = values()
            dct = {**d, **{k[2:]: val for k, val in v.items() if k.startswith("d_")}}
            if index >= dct["n_latents"]:
                return None
            row = {c.name: v[c.name] for c in T_LATENT.c if c.name not in ("dictionary_pk", "index")}
            expl = explanations(q, d["id"], index)
            if runtime.open_cache(dct, store) is not None:  # examples: memory-mapped reads, token decoding: off the loop
                data = await run_in_threadpool(latent_detail, store, dct, index, n_top, row, expl)
            else:
                data = latent_detail(store, dct, index, n_top, row, expl)
            body = render_json(data)
            etag = b'"' + hashlib.blake2b(f"{key}{version}".encode(), digest_size=12).hexdigest().encode() + b'"'
            self.cache.put(key, version, etag, body)
        for k, val in scope.get("headers", []):
            if k == b"if-none-match" and any(t.strip() in (etag, b"*") for t in val.split(b",")):
                return 304, [(b"etag", etag)], b""
        return 200, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                     (b"etag", etag), (b"cache-control", b"no-cache")], body


class FastRoute(Route):
    """Matches like a Route, except for a request the fast path has handed on."""

    def matches(self, scope):
        if scope.get(FULL):
            return Match.NONE, {}
        return super().matches(scope)


def install(app) -> FastLatent:
    """Put the fast path in front of the FastAPI route of GET one latent (first in the app's routes)."""
    from .access import API

    fast = FastLatent(app)
    app.router.routes.insert(0, FastRoute(API + PATH, fast, include_in_schema=False))
    return fast
