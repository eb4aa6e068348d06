"""The parameters of each workflow kind: dataclasses kept in the JSON `params` column.

`dump()` gives the column's value; `load()` checks it (no unknown or missing field,
each of its declared type) and raises ParamsError naming what is wrong, so a row
written by hand or by another version fails plainly instead of deep in a step.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Self


class ParamsError(ValueError):
    """The stored parameters do not fit the workflow's."""


@dataclasses.dataclass(frozen=True)
class Params:
    """No parameters; the base of every kind's parameters."""

    def dump(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, raw: Mapping[str, Any] | None) -> Self:
        raw = dict(raw or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ParamsError(f"unknown parameter {', '.join(unknown)}")
        for name, spec in fields.items():
            if name not in raw:
                if spec.default is dataclasses.MISSING \
                        and spec.default_factory is dataclasses.MISSING:
                    raise ParamsError(f"parameter {name} is missing")
                continue
            if not _fits(raw[name], hints[name]):
                raise ParamsError(f"parameter {name} must be {_describe(hints[name])}, "
                                  f"not {raw[name]!r}")
        loaded = cls(**raw)
        loaded.check()
        return loaded

    def check(self) -> None:
        """Rules beyond the types (a subclass adds its own)."""


def _fits(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is not None:
        return isinstance(value, origin)
    if hint is int:  # JSON has no separate booleans for us to accept as numbers
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint) or hint
    return str(getattr(origin, "__name__", hint))


@dataclasses.dataclass(frozen=True)
class UpdateParams(Params):
    plan_id: str | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    maintenance_version: str | None = None


@dataclasses.dataclass(frozen=True)
class RotationParams(Params):
    cause: str


@dataclasses.dataclass(frozen=True)
class FailoverParams(Params):
    """A failover or a resurrect, with what the monitor saw when it decided."""

    cause: str
    old_primary_id: str
    standby_id: str | None = None
    detected_at: str | None = None   # ISO 8601
    last_primary_lsn: int | None = None
    detail: str | None = None

    def check(self) -> None:
        if self.detected_at is not None:
            try:
                datetime.fromisoformat(self.detected_at)
            except ValueError:
                raise ParamsError(f"parameter detected_at is not a time: "
                                  f"{self.detected_at!r}") from None

    def detected(self) -> datetime | None:
        return datetime.fromisoformat(self.detected_at) if self.detected_at else None


@dataclasses.dataclass(frozen=True)
class RebuildParams(Params):
    cause: str
    replace_node_id: str | None = None
    failover_id: str | None = None   # the event that made the rebuild necessary


BACKUP_TYPES = ("full", "diff")


@dataclasses.dataclass(frozen=True)
class BackupParams(Params):
    """A backup: pgBackRest's type (a differential one with no full backup before it
    becomes full) and who asked for it."""

    type: str = "full"
    cause: str = "requested"

    def check(self) -> None:
        if self.type not in BACKUP_TYPES:
            raise ParamsError(f"parameter type must be one of {', '.join(BACKUP_TYPES)}, "
                              f"not {self.type!r}")
