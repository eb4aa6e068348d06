"""A select compiled once and run on a raw DB-API connection from the pool.

last_operation is what platforms call most, and there SQLAlchemy's per-execute
machinery (connection wrapper, cache key, result object) costs more than SQLite
or PostgreSQL themselves. Only for simple read-only selects of plain columns
(no type processing, no expanding IN).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, Select


class CompiledSelect:
    def __init__(self, engine: Engine, statement: Select[*tuple[Any, ...]]) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self._engine = engine
        self._sql = str(compiled)
        # qmark (SQLite) takes a tuple in the compiled order; pyformat a dict.
        self._order = list(compiled.positiontup or []) if compiled.positional else None

    def first(self, **params: Any) -> tuple[Any, ...] | None:
        args: Any = tuple(params[name] for name in self._order) if self._order is not None \
            else params
        conn = self._engine.raw_connection()  # the pool rolls back on return
        try:
            cursor = conn.cursor()
            try:
                cursor.execute(self._sql, args)
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            conn.close()
        return None if row is None else tuple(row)
