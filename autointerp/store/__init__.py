"""The SQL store: the single source of truth for dictionaries, latents, explanations, scores and jobs.

SQLite (one file, WAL) by default, PostgreSQL by `AUTOINTERP_DATABASE_URL`; schema by the Alembic migrations in db/.
"""

from .engine import URL_ENV, StoreError, resolve_url, upgrade
from .store import HEADLINE, Store, headline, open_store

__all__ = ["Store", "StoreError", "open_store", "upgrade", "resolve_url", "URL_ENV", "headline", "HEADLINE"]
