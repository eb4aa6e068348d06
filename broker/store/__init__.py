"""The state store: models and sessions (SQLite by default, PostgreSQL in production)."""

from broker.store.db import Store

__all__ = ["Store"]
