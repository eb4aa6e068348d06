"""In-process metrics: counted where things happen (monitor, engine, cloud calls).

They live in their own registry, not prometheus_client's global one, so that a
process exposes exactly these plus, where it asks for it, the store's view.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

# A probe's deadline is 1 s by default: buckets around it, with room for slow ones.
_PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0)

probe_seconds = Histogram(
    "pgha_monitor_probe_duration_seconds", "Time one health probe of a node took.",
    ["role", "outcome"], buckets=_PROBE_BUCKETS, registry=REGISTRY)
checks = Counter(
    "pgha_monitor_checks", "Checks of an instance (observe, decide, act) the monitor ran.",
    registry=REGISTRY)
primary_failed_probes = Gauge(
    "pgha_monitor_primary_failed_probes",
    "Consecutive failed probes of an instance's primary, as the monitor holding it counts.",
    ["instance_id"], registry=REGISTRY)
operation_retries = Counter(
    "pgha_operation_retries", "Times an operation was released to be run again later.",
    ["kind"], registry=REGISTRY)
# From the start of the first failed probe of a primary to its failover being queued.
detect_seconds = Histogram(
    "pgha_failover_detect_seconds",
    "Time from the first failed probe of a primary to its failover (or resurrect) queued.",
    buckets=(0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0), registry=REGISTRY)
cloud_api_errors = Counter(
    "pgha_cloud_api_errors", "Failed cloud API calls (each failed attempt), by call.",
    ["call"], registry=REGISTRY)


class CheckClock(Collector):
    """When the monitor last checked each instance it holds: the age of the oldest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}

    def watch(self, instance_id: str) -> None:
        """A newly held instance counts as unchecked from now on."""
        with self._lock:
            self._last.setdefault(instance_id, time.monotonic())

    def checked(self, instance_id: str) -> None:
        with self._lock:
            self._last[instance_id] = time.monotonic()

    def forget(self, instance_id: str) -> None:
        with self._lock:
            self._last.pop(instance_id, None)
        primary_failed_probes.remove(instance_id)  # no-op when never set

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            oldest = min(self._last.values(), default=None)
            held = len(self._last)
        age = 0.0 if oldest is None else time.monotonic() - oldest
        yield GaugeMetricFamily("pgha_monitor_oldest_check_age_seconds",
                                "Seconds since the least recently checked instance this "
                                "monitor holds was checked.", value=age)
        yield GaugeMetricFamily("pgha_monitor_instances_held",
                                "Instances whose monitor lease this process holds.", value=held)


check_clock = CheckClock()
REGISTRY.register(check_clock)


class Detection:
    """When each primary's current run of failed probes began (monotonic seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: dict[str, float] = {}

    def probed(self, instance_id: str, *, down: bool, first_started: float | None) -> None:
        """`first_started`: when the probe began, if it was the first after a success."""
        with self._lock:
            if not down:
                self._since.pop(instance_id, None)
            elif first_started is not None:
                self._since.setdefault(instance_id, first_started)

    def acted(self, instance_id: str) -> None:
        with self._lock:
            since = self._since.pop(instance_id, None)
        if since is not None:
            detect_seconds.observe(time.monotonic() - since)


detection = Detection()


def observe_probe(role: str, outcome: str, seconds: float) -> None:
    probe_seconds.labels(role=role, outcome=outcome).observe(seconds)


def checked(instance_id: str, primary_failures: int) -> None:
    checks.inc()
    check_clock.checked(instance_id)
    primary_failed_probes.labels(instance_id=instance_id).set(primary_failures)


# Words up to the first one that names a resource (ids and names hold digits, dashes,
# dots or colons): "deleting server pgha-x-1" → "deleting server".
_NAME = re.compile(r"[\d\-_.:/]")


def call_name(what: str) -> str:
    """A cloud call's description without resource names: a label of few values."""
    words = []
    for word in what.split()[:6]:
        if _NAME.search(word):
            break
        words.append(word)
    return " ".join(words) or "unnamed call"


def cloud_error(what: str) -> None:
    cloud_api_errors.labels(call=call_name(what)).inc()
