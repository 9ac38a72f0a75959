"""Alembic environment: the store's metadata (autointerp.store.tables); the URL comes from the caller's Config
(`autointerp db upgrade`, or the first open of a new database)."""

from alembic import context
from sqlalchemy import pool
from sqlmodel import SQLModel

import autointerp.store.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from autointerp.store.engine import make_engine

config = context.config
target_metadata = SQLModel.metadata


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            connection.info["write"] = True
            context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
