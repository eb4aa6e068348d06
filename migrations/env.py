"""Alembic environment: the engine comes from the broker (`broker db upgrade`)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from broker.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # The broker passes a connection holding its upgrade lock (PostgreSQL) ...
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    # ... or an engine (SQLite), or `alembic` is run by hand with sqlalchemy.url.
    engine = config.attributes.get("engine")
    if engine is None:
        engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as conn:
        _configure_and_run(conn)


run_migrations_online()
