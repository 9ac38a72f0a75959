"""Where the store lives and how it is opened: one SQLite file by default, PostgreSQL by URL.

URL: `AUTOINTERP_DATABASE_URL` (or the `url` argument); default `sqlite:///<cache root>/autointerp.db`.
`postgresql://…` uses psycopg 3. SQLite runs in WAL mode with a busy timeout, so several worker processes on one
machine write safely (each write transaction is short; readers never block writers).

Schema: Alembic migrations in autointerp/db/ (inside the package, so a wheel carries them). A new, empty database
is brought to the current schema on first open. An SQLite store at an older revision is upgraded on open, said once
on stderr (it is one user's embedded file, and a release that adds an index should not stop the CLI). A PostgreSQL
database at an older revision is refused with one line telling the user to run `autointerp db upgrade` (a migration
of a shared database is an operator's decision, never a side effect of a worker starting).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from ..errors import ConfigError

URL_ENV = "AUTOINTERP_DATABASE_URL"
MIGRATIONS = Path(__file__).resolve().parents[1] / "db"  # autointerp/db: env.py, script.py.mako, versions/


class StoreError(ConfigError):
    """The store cannot be used as asked (unreachable, wrong URL, schema older than the code)."""


def default_url() -> str:
    from ..paths import cache_root

    return f"sqlite:///{cache_root() / 'autointerp.db'}"


def resolve_url(url: str | None = None) -> str:
    raw = url or os.environ.get(URL_ENV) or default_url()
    try:
        u = make_url(raw)
    except ArgumentError:
        raise StoreError(f"database URL {raw!r}: expected sqlite:///PATH or postgresql://USER@HOST/DB") from None
    if u.get_backend_name() == "sqlite":
        return raw
    if u.get_backend_name() == "postgresql":
        return u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise StoreError(f"database URL {u.render_as_string()!r}: scheme {u.drivername!r} is not supported "
                     "(expected sqlite:/// or postgresql://)")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, consistent after a crash
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
    dbapi_conn.isolation_level = None


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_begin(conn) -> None:
    # pysqlite's implicit BEGIN is off (isolation_level=None in _sqlite_pragmas): a write transaction takes the write
    # lock at BEGIN (IMMEDIATE), so two processes that read then write wait on the busy timeout instead of failing
    # with "database is locked" on the upgrade; reads stay deferred and never block.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def alembic_config(url: str):
    from alembic.config import Config

    if not (MIGRATIONS / "env.py").is_file():
        raise StoreError(f"{MIGRATIONS}: Alembic migrations not found (a broken install: reinstall autointerp)")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(url: str | None = None) -> tuple[str | None, str]:
    """Bring the database to the newest schema; returns (revision before, revision after)."""
    from alembic import command

    url = resolve_url(url)
    engine = make_engine(url)
    try:
        before = _check_reachable(engine, url)
        command.upgrade(alembic_config(url), "head")
        return before, current_revision(engine)
    finally:
        engine.dispose()


def _check_reachable(engine: Engine, url: str) -> str | None:
    try:
        return current_revision(engine)
    except OperationalError as e:
        msg = " ".join(str(e.orig).split()) if e.orig else str(e)
        raise StoreError(f"database {make_url(url).render_as_string()} is unreachable: {msg[:300]}") from None


def _auto_upgrade(engine: Engine, url: str, rev: str, head: str) -> None:
    """Upgrade an embedded SQLite store. Another process opening it may upgrade it at the same time: when ours fails,
    the store at the head revision is what counts."""
    import sys

    try:
        upgrade(url)
    except Exception as e:  # noqa: BLE001 - judged by the revision the store is at afterwards
        if current_revision(engine) != head:
            raise StoreError(f"database {make_url(url).render_as_string()} is at schema {rev}; upgrading it to "
                             f"{head} failed: {' '.join(str(e).split())[:300]}") from None
    print(f"autointerp: upgraded the store {make_url(url).render_as_string()} from schema {rev} to {head}",
          file=sys.stderr)


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    """The engine of a URL, checked once per process: reachable, and at the code's schema (a new database is
    created at it)."""
    engine = make_engine(url)
    try:
        rev = _check_reachable(engine, url)
        head = head_revision(url)
        if rev is None:
            with engine.connect() as conn:
                tables = set(inspect(conn).get_table_names())
            if tables - {"alembic_version"}:
                raise StoreError(f"database {make_url(url).render_as_string()} holds tables but no autointerp schema "
                                 "version: point AUTOINTERP_DATABASE_URL at an autointerp store or an empty database")
            upgrade(url)
        elif rev != head and engine.dialect.name == "sqlite":
            _auto_upgrade(engine, url, rev, head)
        elif rev != head:
            raise StoreError(f"database {make_url(url).render_as_string()} is at schema {rev}, this autointerp needs "
                             f"{head}: run `autointerp db upgrade`")
    except (StoreError, SQLAlchemyError):
        engine.dispose()
        raise
    return engine
