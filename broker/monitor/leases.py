"""Named leases in the state store: who watches which instance.

A lease is a row `models.Lease(name, owner, expires_at)`. Every change is a single
compare-and-set statement, so it is correct on SQLite (one writer at a time) and on
PostgreSQL at READ COMMITTED (a concurrent UPDATE re-checks its WHERE clause on the
row the winner wrote, so exactly one of two racing workers gets rowcount 1):

- acquire: UPDATE ... WHERE name = :n AND (owner = me OR expires_at < now), else
  INSERT (a primary-key clash means someone else was first);
- renew: UPDATE ... WHERE name = :n AND owner = me;
- release: DELETE ... WHERE name = :n AND owner = me;
- acquire_many / renew_many: the same statements over a list of names, with
  RETURNING (INSERT ... ON CONFLICT DO NOTHING for the new ones): a monitor holding
  1,000 instances renews them in one statement per interval.

A lease whose owner is a dead process on this host is taken over at once (the same
rule as the operation queue, queue.owner_is_dead); elsewhere it expires after `ttl`
seconds. Times are
the workers' clocks (UTC): workers must keep them in sync (NTP) to well under `ttl`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from broker.operations.queue import host_identity, owner_is_dead
from broker.store.db import Store
from broker.store.models import Lease, aware, utcnow

log = logging.getLogger(__name__)

MONITOR_PREFIX = "monitor:"
WORKER_PREFIX = "monitor-worker:"


def monitor_lease_name(instance_id: str) -> str:
    return f"{MONITOR_PREFIX}{instance_id}"


class Leases:
    """Compare-and-set leases for one owner."""

    def __init__(self, store: Store, owner: str, ttl: float) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        # Only this machine's processes can be looked up: an owner naming another host
        # loses its lease by expiry alone, whatever host the owner id itself names.
        self.host = host_identity()

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.ttl)

    def _compare_and_set(self, name: str, *conditions: ColumnElement[bool],
                         now: datetime) -> bool:
        """Make the lease ours until now + ttl where `conditions` hold; True if it did."""
        with self.store.session() as s:
            result = s.execute(
                update(Lease)
                .where(Lease.name == name, *conditions)
                .values(owner=self.owner, expires_at=self._expiry(now))
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def acquire(self, name: str) -> bool:
        """Take the lease if it is free, expired, ours or held by a dead process."""
        now = utcnow()
        if self._compare_and_set(name, (Lease.owner == self.owner) | (Lease.expires_at < now),
                                 now=now):
            return True
        with self.store.session() as s:
            row = s.execute(select(Lease.owner, Lease.expires_at).where(Lease.name == name)).first()
        if row is None:
            return self._insert(name, now)
        owner, expires = row
        if owner != self.owner and owner_is_dead(owner, self.host):
            # Same host, process gone: no need to wait for the expiry.
            return self._compare_and_set(name, Lease.owner == owner,
                                         Lease.expires_at == expires, now=now)
        return False

    def acquire_many(self, names: list[str]) -> set[str]:
        """`acquire` for many leases at once (a worker taking over 1,000 instances):
        the free, expired and own ones in three statements, those of a dead process on
        this host one by one; returns the names now ours."""
        if not names:
            return set()
        now = utcnow()
        with self.store.session() as s:
            taken = {str(n) for (n,) in s.execute(
                update(Lease)
                .where(Lease.name.in_(names),
                       (Lease.owner == self.owner) | (Lease.expires_at < now))
                .values(owner=self.owner, expires_at=self._expiry(now))
                .returning(Lease.name)
                .execution_options(synchronize_session=False))}
            holders = {str(n): str(o) for n, o in s.execute(
                select(Lease.name, Lease.owner).where(Lease.name.in_(names)))}
        missing = [n for n in names if n not in holders]
        if missing:
            insert = pg_insert if self.store.engine.dialect.name == "postgresql" else sqlite_insert
            with self.store.session() as s:
                taken |= {str(n) for (n,) in s.execute(
                    insert(Lease)
                    .values([{"name": n, "owner": self.owner, "expires_at": self._expiry(now)}
                             for n in missing])
                    .on_conflict_do_nothing(index_elements=["name"])
                    .returning(Lease.name))}
        for name, owner in holders.items():
            if name not in taken and owner_is_dead(owner, self.host) and self.acquire(name):
                taken.add(name)
        return taken

    def _insert(self, name: str, now: datetime) -> bool:
        try:
            with self.store.session() as s:
                s.add(Lease(name=name, owner=self.owner, expires_at=self._expiry(now)))
        except IntegrityError:
            return False  # another worker inserted it first
        return True

    def renew(self, name: str) -> bool:
        """Extend a lease we hold; False if it is no longer ours (then stop acting)."""
        return self._compare_and_set(name, Lease.owner == self.owner, now=utcnow())

    def renew_many(self, names: list[str]) -> set[str]:
        """`renew` for many leases in one statement; the names still ours."""
        if not names:
            return set()
        with self.store.session() as s:
            rows = s.execute(
                update(Lease)
                .where(Lease.name.in_(names), Lease.owner == self.owner)
                .values(expires_at=self._expiry(utcnow()))
                .returning(Lease.name)
                .execution_options(synchronize_session=False)
            )
            return {str(name) for (name,) in rows}

    def release(self, name: str) -> None:
        with self.store.session() as s:
            s.execute(
                delete(Lease)
                .where(Lease.name == name)
                .where(Lease.owner == self.owner)
                .execution_options(synchronize_session=False)
            )

    def term(self, name: str) -> tuple[str, datetime] | None:
        """Who holds a lease and until when, expired or not (None when there is none)."""
        with self.store.session() as s:
            row = s.execute(select(Lease.owner, Lease.expires_at).where(Lease.name == name)).first()
        expires = aware(row[1]) if row is not None else None
        return (str(row[0]), expires) if row is not None and expires is not None else None

    def holder(self, name: str) -> str | None:
        """The live holder of a lease (None when free or expired)."""
        term = self.term(name)
        return term[0] if term is not None and term[1] >= utcnow() else None

    def live(self, prefix: str) -> dict[str, str]:
        """name → owner of every unexpired lease whose name starts with `prefix`."""
        now = utcnow()
        with self.store.session() as s:
            rows = s.execute(
                select(Lease.name, Lease.owner)
                .where(Lease.name.startswith(prefix, autoescape=True))
                .where(Lease.expires_at >= now)
            ).all()
        return {str(name): str(owner) for name, owner in rows}

    def purge_expired(self, prefix: str, older_than: float = 60.0) -> None:
        """Drop long-expired leases (a dead worker's heartbeat) so the table stays small."""
        cutoff = utcnow() - timedelta(seconds=older_than)
        with self.store.session() as s:
            s.execute(
                delete(Lease)
                .where(Lease.name.startswith(prefix, autoescape=True))
                .where(Lease.expires_at < cutoff)
                .execution_options(synchronize_session=False)
            )
