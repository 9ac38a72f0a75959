"""Who may call what: API-key checks (X-API-Key or a bearer token, checked from the raw headers before a body is
read) and the route classes that apply them. Shared by the app, the API routes and the pages, which import this
module and never the app (the app imports them)."""

from __future__ import annotations

import functools
import hashlib
import threading
import time

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from ..store import Store

API = "/api/v1"

_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (autointerp apikey create)")
_bearer = HTTPBearer(auto_error=False, description="The same API key as a bearer token")


class KeyCheck:
    """Valid keys are remembered (by hash) for a minute: a keyed client does not cost a query per request."""

    def __init__(self):
        self.ok: dict[str, float] = {}
        self.lock = threading.Lock()

    def valid(self, store: Store, key: str) -> bool:
        h = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        with self.lock:
            if self.ok.get(h, 0) > now:
                return True
        if len(key) > 200 or not store.api_key_valid(key):
            return False
        with self.lock:
            self.ok[h] = now + 60.0
        return True


def _presented(key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    if key:
        return key
    if bearer is not None and bearer.credentials:
        return bearer.credentials
    return None


def require_key(request: Request, key: str | None = Depends(_key_header),
                bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    k = _presented(key, bearer)
    if not k:
        raise HTTPException(401, "this endpoint needs an API key: send X-API-Key: KEY (autointerp apikey create)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not request.app.state.keys.valid(request.app.state.store, k):
        raise HTTPException(401, "API key not valid (unknown or revoked)", headers={"WWW-Authenticate": "Bearer"})


def _key_from_headers(request: Request) -> str | None:
    k = request.headers.get("x-api-key")
    if k:
        return k
    scheme, _, cred = request.headers.get("authorization", "").partition(" ")
    return cred.strip() if scheme.lower() == "bearer" and cred.strip() else None


def check_request_key(request: Request, required: bool = True) -> None:
    """The key check itself, from the raw headers (so it runs before the body is parsed: an unauthenticated
    request gets 401 whatever its body)."""
    if not required:
        return
    k = _key_from_headers(request)
    if not k:
        raise HTTPException(401, "this endpoint needs an API key: send X-API-Key: KEY (autointerp apikey create)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not request.app.state.keys.valid(request.app.state.store, k):
        raise HTTPException(401, "API key not valid (unknown or revoked)", headers={"WWW-Authenticate": "Bearer"})


class KeyedRoute(APIRoute):
    """Routes that need a key: checked before anything else of the request is looked at."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            await run_in_threadpool(check_request_key, request)
            return await handler(request)

        return checked


class ReadRoute(APIRoute):
    """Read routes: keyed too when the configuration says so."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def checked(request: Request):
            if request.app.state.settings.read_key_required:
                await run_in_threadpool(check_request_key, request)
            return await handler(request)

        return checked


async def read_access(request: Request, key: str | None = Depends(_key_header),
                      bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """async: an open read route costs no thread hop for this check; a keyed one checks the key in a thread (it may
    query the store)."""
    if request.app.state.settings.read_key_required:
        await run_in_threadpool(require_key, request, key, bearer)


def store_read_limiter(store: Store, settings):
    """The capacity limiter of the quick read routes (store_read): on SQLite, `settings.sqlite_read_threads`
    threads at a time; elsewhere (PostgreSQL waits on the network) None, anyio's default of 40."""
    import anyio

    n = int(getattr(settings, "sqlite_read_threads", 0) or 0)
    return anyio.CapacityLimiter(n) if store.dialect == "sqlite" and n > 0 else None


def store_read(fn):
    """A quick read route (a few indexed queries, no model, no file): run in a thread of the app's store-read
    limiter instead of any of anyio's 40. Measured on SQLite with 8 concurrent clients: one process's requests
    running in 8 threads at once cost 2-3x the CPU each (the GIL handed back and forth around every SQLite call,
    futex waits) — fewer threads answer more requests, with a lower p99. The route's signature is kept (FastAPI
    reads its parameters through __wrapped__); it needs a `request` parameter."""
    import anyio

    @functools.wraps(fn)
    async def run(*args, **kw):
        request = kw.get("request")
        limiter = request.app.state.read_limiter if request is not None else None
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kw), limiter=limiter)

    return run
