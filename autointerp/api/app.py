"""The FastAPI application: `create_app(settings)` builds it (JSON API under /api/v1, web pages under /).

Security defaults: every write, job, steering and activation endpoint needs an API key (`X-API-Key: KEY` or
`Authorization: Bearer KEY`; only sha256 hashes are stored, `autointerp apikey create` makes one); reads are open
unless `AUTOINTERP_API_READ_KEY=1`; CORS is closed unless `AUTOINTERP_API_CORS_ORIGINS` lists origins; request
bodies over `max_body_bytes` (1 MiB) are refused with 413 before they are read; page sizes and text lengths are
capped; every error is a JSON `Problem` body with one line naming what was wrong; pages are served with a strict
Content-Security-Policy (scripts only from this server) and every dataset text is HTML-escaped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AutointerpError, ConfigError
from ..store import Store, open_store
from .access import (API, KeyCheck, read_access, require_key,  # noqa: F401 (require_key, read_access: the API's own)
                     store_read_limiter)

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent


def _env_bool(name: str, default: bool = False) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() in ("1", "true", "yes", "on")


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    try:
        return max(0.0, float(v)) if v else default
    except ValueError:
        raise ConfigError(f"{name}={v!r}: expected a number") from None


@dataclass
class Settings:
    database_url: str | None = None  # default: $AUTOINTERP_DATABASE_URL, else the SQLite file
    read_key_required: bool = field(default_factory=lambda: _env_bool("AUTOINTERP_API_READ_KEY"))
    cors_origins: list[str] = field(default_factory=lambda: [o.strip() for o in os.environ.get(
        "AUTOINTERP_API_CORS_ORIGINS", "").split(",") if o.strip()])
    max_body_bytes: int = 1 << 20
    max_page: int = 200
    embedded_runner: bool = field(default_factory=lambda: _env_bool("AUTOINTERP_API_RUN_JOBS", True))
    # GET one latent: serialised answers kept per latent, checked against the store on every request (0: off)
    latent_cache_mb: float = field(default_factory=lambda: _env_float("AUTOINTERP_API_LATENT_CACHE_MB", 64.0))
    # SQLite: search, the latents list, a dictionary and their pages kept per query until the next write (0: off)
    read_cache_mb: float = field(default_factory=lambda: _env_float("AUTOINTERP_API_READ_CACHE_MB", 32.0))
    # SQLite: threads that read the store at once for the quick read routes (access.store_read); more threads
    # than cores made each request dearer (the GIL and SQLite's released-and-retaken locks), 0: no limit
    sqlite_read_threads: int = field(default_factory=lambda: int(_env_float("AUTOINTERP_API_SQLITE_READ_THREADS", 2)))
    # subject model device for /activations and /steer (default: CUDA when present)
    device: str | None = field(default_factory=lambda: os.environ.get("AUTOINTERP_API_DEVICE") or None)


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over `limit` bytes, by Content-Length up front, or while it streams."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await _problem(send, 400, "bad_request", "Content-Length is not a number")
                if n > self.limit:
                    return await _problem(send, 413, "too_large",
                                          f"request body of {n} bytes: at most {self.limit} bytes are accepted")
        seen = 0
        started = False

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await _problem(send, 413, "too_large", f"request body over {self.limit} bytes")


class _TooLarge(StarletteHTTPException):
    """An HTTPException, so that FastAPI's body parsing re-raises it (it turns other errors into a 400) and the
    app's handler answers it as a 413 Problem."""

    def __init__(self, limit: int = 0):
        super().__init__(413, f"request body over {limit} bytes")


async def _problem(send, status: int, error: str, detail: str):
    import json

    body = json.dumps({"error": error, "detail": detail, "field": None}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """nosniff everywhere; a Content-Security-Policy on pages: scripts and styles only from this server (inline style
    attributes allowed: token colours), no frames, no plugins — an unescaped payload could not run anyway."""

    CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
           "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def add(msg):
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                ctype = dict(headers).get(b"content-type", b"")
                if ctype.startswith(b"text/html"):
                    headers.append((b"content-security-policy", self.CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, add)


_KINDS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 422: "invalid", 429: "too_many_requests", 501: "not_implemented",
          503: "unavailable"}


def problem(status: int, detail: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": _KINDS.get(status, "error"), "detail": detail, "field": field}, status_code=status,
                        headers=headers)


def _not_found(msg: str) -> bool:
    m = msg.lower()
    return m.startswith("unknown ") or "out of range" in m or "not in dictionary" in m


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.staticfiles import StaticFiles

    from .. import __version__
    from . import fast, routes, web
    from .read_cache import ReadCache

    settings = settings or Settings()
    app = FastAPI(title="autointerp", version=__version__,
                  description="Explanations and scores of sparse-autoencoder latents: browse, search, compare, "
                              "run jobs. Writes, jobs, steering and activations need an API key (X-API-Key).",
                  openapi_url=f"{API}/openapi.json", docs_url=f"{API}/docs", redoc_url=None)
    app.state.settings = settings
    app.state.store = store or open_store(settings.database_url)
    app.state.keys = KeyCheck()
    app.state.runners = {}
    app.state.read_limiter = store_read_limiter(app.state.store, settings)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errs = exc.errors()
        e = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "header")]
        where = ".".join(loc) or None
        return problem(422, f"{where or 'request'}: {e.get('msg', 'invalid')}", where)

    @app.exception_handler(AutointerpError)
    async def _ours(request, exc: AutointerpError):
        msg = " ".join(str(exc).split())
        return problem(404 if _not_found(msg) else 400, msg)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, f"internal error ({type(exc).__name__}); the server log has the details")

    app.include_router(routes.router, prefix=API)
    app.state.fast_latent = fast.install(app)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(ReadCache, state=app.state)  # innermost: CORS and security headers apply to its answers
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key", "Authorization", "Content-Type"])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def openapi_schema(app: FastAPI | None = None) -> dict:
    """The app's OpenAPI schema (what autointerp/api/openapi.json must equal)."""
    return (app or create_app(Settings(embedded_runner=False))).openapi()


__all__ = ["create_app", "Settings", "openapi_schema", "require_key", "read_access", "problem", "ConfigError"]
