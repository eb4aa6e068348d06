"""Engine, sessions and schema upgrades for the state store (SQLite or PostgreSQL)."""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from broker.config import ROOT

log = logging.getLogger(__name__)
MIGRATIONS = ROOT / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            # The state dir is traversable by PostgreSQL's user (local volumes live
            # below it): the database itself is for root only. SQLite gives its
            # -wal/-shm files the same mode.
            Path(path).touch(mode=0o600, exist_ok=True)
            Path(path).chmod(0o600)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the worker writes; FKs are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # A commit then writes the WAL without waiting for the disk (fsync at
            # checkpoints only): still atomic and never corrupt, and an acknowledged
            # commit survives the broker's crash, only an OS crash or power loss may
            # undo the last ones. FULL's fsync per commit (5-40 ms on a loaded disk)
            # made a dead host's ten failovers wait for each other's commits, a few
            # dozen each: seconds.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        # SQLAlchemy 2.1 defaults to psycopg 3; the broker ships psycopg2.
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    # A worker runs up to BROKER_MAX_FAILOVERS (16 on OpenStack) failovers at once
    # beside its monitor and engine threads, each holding a session while it runs a
    # query: with 10 connections at most, a dead host's failovers queued for the pool.
    # Beyond pool_size the extra connections close again once returned.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=25)


class Store:
    """The state store: one engine and a session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed on success, rolled back on any exception."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def upgrade(self) -> None:
        upgrade_schema(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


_UPGRADE_LOCK = 7_345_001  # pg_advisory_lock key: web and worker may start together


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest migration (safe to run at every start)."""
    cfg = alembic_config(engine)
    if engine.dialect.name != "postgresql":
        # SQLite: `web` and `worker` started together must not both create tables.
        database = engine.url.database
        lock_path = f"{database}.migrate-lock" if database and database != ":memory:" else None
        if lock_path is None:
            command.upgrade(cfg, "head")
            return
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            command.upgrade(cfg, "head")
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _UPGRADE_LOCK})
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _UPGRADE_LOCK})
            conn.commit()
