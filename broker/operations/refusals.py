"""Why the broker will not do what was asked: the domain's answers other than yes.

Raised by the request decisions (`requests.py`) and by bindings; the API turns each
kind into one HTTP answer (`broker.api.errors`), the CLI prints the sentence. The
message is a sentence for the platform's user.
"""

from __future__ import annotations


class Refused(Exception):
    """A request the broker refuses; the message says why."""


class InvalidRequest(Refused):
    """The request itself is wrong (a parameter the plan does not take, a wrong service)."""


class UnknownInstance(Refused):
    """The instance to change or bind to does not exist (or was deprovisioned)."""


class NotFound(Refused):
    """What was asked about does not exist."""


class AlreadyGone(Refused):
    """What was asked to be deleted does not exist (or was deleted already)."""


class Conflict(Refused):
    """The id exists with other attributes, or can never be used again."""


class Busy(Refused):
    """Another operation runs on the instance, or it is not ready for this yet: retry later."""


class NotAllowed(Refused):
    """The instance's plan or state does not allow this."""


class MaintenanceMismatch(Refused):
    """The maintenance version asked for is not the plan's."""


class AsyncRequired(Refused):
    """The work is long and the caller did not accept an unfinished answer."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is asynchronous: send accepts_incomplete=true")
