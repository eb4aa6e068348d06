"""The probe event loop: persistent connections to every watched node, one thread.

Each (instance, role) has a `probe.Link`, a persistent psycopg2 asynchronous session;
every registered socket sits in one `selectors` selector. The health query of every due
link is started at once and all are driven from the selector until each has
answered or passed its deadline. Between sweeps the idle sockets stay registered: a
socket that turns readable while idle means the server closed the session or said
goodbye (a crash, a shutdown), and the link is probed at once, so a dead primary is
seen within milliseconds rather than at its next check. The caller submits probes
when they are due and reads results through `on_result`; probes in flight carry
over from one `run` to the next.

New sessions (at start, after a failure) cost a TLS handshake and a SCRAM exchange
each; at most `MAX_CONNECTING` run at once so that a monitor taking over 1,000
instances does not starve the probes of the sessions it already has.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from broker.pg.probe import Link, Probe

# Sessions being set up at once (each costs a handshake on both ends).
MAX_CONNECTING = 16
# The longest the loop sleeps without looking at `stop`.
STOP_POLL = 0.25

Key = tuple[str, str]                       # (instance id, "primary" | "standby")
OnResult = Callable[[Key, Probe], None]
OnSlow = Callable[[Key], None]


class ProbeLoop:
    def __init__(self, timeout: float, on_result: OnResult, *,
                 suspect_after: float | None = None, on_slow: OnSlow | None = None) -> None:
        self.timeout = timeout
        self.on_result = on_result
        # A query on an open session unanswered for `suspect_after` is reported once to
        # `on_slow` (the probe runs on to its deadline). Not a new session's setup: a
        # handshake may be slow without anything being wrong.
        self.suspect_after = suspect_after
        self.on_slow = on_slow
        self._reported_slow: set[Key] = set()
        self.links: dict[Key, Link] = {}
        self.selector = selectors.DefaultSelector()
        self._registered: dict[Key, tuple[int, int]] = {}   # key → (fd, events)
        self._busy: set[Key] = set()
        self._waiting: deque[Key] = deque()           # to connect, when a slot frees

    # --- links -------------------------------------------------------------------------
    def link(self, key: Key, address: str, password: str, ca_pem: str | None) -> Link:
        """The key's link, replaced when the node (address, password, CA) changed."""
        link = self.links.get(key)
        if link is not None and not link.same_target(address, password, ca_pem):
            self.close(key)
            link = None
        if link is None:
            link = self.links[key] = Link(address, password, ca_pem=ca_pem)
        return link

    def close(self, key: Key) -> None:
        self._busy.discard(key)
        self._reported_slow.discard(key)
        self._unwatch(key)
        link = self.links.pop(key, None)
        if link is not None:
            link.close()
        if key in self._waiting:
            self._waiting.remove(key)

    def keep_only(self, instance_ids: Iterable[str]) -> None:
        """Close the links of instances no longer probed here."""
        keep = set(instance_ids)
        for key in [k for k in self.links if k[0] not in keep]:
            self.close(key)

    def close_all(self) -> None:
        for key in list(self.links):
            self.close(key)
        self.selector.close()

    def _unwatch(self, key: Key) -> None:
        """Take the key's socket out of the selector (only that: a probe running on a
        new socket stays in `_busy`, where its deadline is enforced)."""
        known = self._registered.pop(key, None)
        if known is not None:
            # The fd may be closed already (the kernel forgot it).
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(known[0])

    def _sync(self, key: Key, link: Link) -> None:
        """Register the link's socket for what it waits for (read while idle), and keep
        `_busy` (the probes whose deadline `run` enforces) in step with the link."""
        self._watch_socket(key, link)
        if link.busy:
            self._busy.add(key)
        else:
            self._busy.discard(key)

    def _watch_socket(self, key: Key, link: Link) -> None:
        if link.conn is None:
            self._unwatch(key)
            return
        fd = link.fileno()
        known = self._registered.get(key)
        if known == (fd, link.events):
            return
        if known is not None and known[0] == fd:
            try:
                self.selector.modify(fd, link.events, key)
                self._registered[key] = (fd, link.events)
                return
            except (KeyError, OSError):
                pass  # libpq closed that socket and a new one got its number
        self._unwatch(key)
        with contextlib.suppress(KeyError):
            # The number was another link's, whose socket libpq closed meanwhile: that
            # link registers its new socket at its next step.
            self._unwatch(self.selector.get_key(fd).data)
        self.selector.register(fd, link.events, key)
        self._registered[key] = (fd, link.events)

    # --- the loop ------------------------------------------------------------------------
    def _start(self, key: Key, link: Link) -> None:
        self._reported_slow.discard(key)
        result = link.start(self.timeout)
        if result is not None:
            self.on_result(key, result)
        self._sync(key, link)

    def submit(self, jobs: Iterable[Key]) -> None:
        """Start a probe on every key (links made beforehand with `link`); those that
        must connect first wait for a connecting slot."""
        for key in jobs:
            link = self.links[key]
            if link.conn is None:
                self._waiting.append(key)
            elif not link.busy:
                self._start(key, link)

    def _suspect_times(self) -> dict[Key, float]:
        """When each running query on an open session turns suspect (not yet reported)."""
        if self.on_slow is None or self.suspect_after is None:
            return {}
        return {k: self.links[k].started + self.suspect_after for k in self._busy
                if k not in self._reported_slow and not self.links[k].connecting}

    def tracked(self) -> set[Key]:
        """The keys whose probe runs (with its deadline) or waits for a connecting slot."""
        return self._busy | set(self._waiting)

    @property
    def in_flight(self) -> int:
        return len(self._busy) + len(self._waiting)

    def run(self, *, until: float, stop: threading.Event) -> None:
        """Drive the probes, reporting each result to `on_result`, and probe at once any
        idle link whose socket turns readable, until `until` (monotonic) or `stop`."""
        while True:
            if self._waiting:
                connecting = sum(1 for k in self._busy if self.links[k].connecting)
                while self._waiting and connecting < MAX_CONNECTING:
                    key = self._waiting.popleft()
                    queued = self.links.get(key)
                    if queued is not None and not queued.busy:
                        self._start(key, queued)
                        connecting += 1
            # At least one look at the sockets, even when called late.
            now = time.monotonic()
            wake = min([until, *(self.links[k].deadline for k in self._busy),
                        *self._suspect_times().values()])
            events = self.selector.select(max(0.0, min(wake - now, STOP_POLL)))
            for selector_key, _mask in events:
                key = selector_key.data
                ready = self.links.get(key)
                if ready is None:
                    continue
                result = ready.advance() if ready.busy else ready.start(self.timeout)
                if result is not None:
                    self.on_result(key, result)
                self._sync(key, ready)
            now = time.monotonic()
            for key in [k for k in self._busy if self.links[k].deadline <= now]:
                # An answer that arrived while this thread was busy elsewhere counts.
                link = self.links.get(key)
                if link is None or not link.busy:
                    continue  # closed or answered meanwhile, by another key's result
                result = link.advance() or link.expire()
                self._sync(key, link)
                self.on_result(key, result)
            for key, at in self._suspect_times().items():
                if at > now or key not in self._busy:   # closed by an earlier callback
                    continue
                link = self.links[key]
                # An answer that arrived while this thread was busy elsewhere (a store
                # write, another slice) is no hang.
                result = link.advance()
                if result is not None:
                    self._sync(key, link)
                    self.on_result(key, result)
                    continue
                self._reported_slow.add(key)
                assert self.on_slow is not None
                self.on_slow(key)
            if now >= until or stop.is_set():
                return
