"""Calling OpenStack: retries with backoff, plain error sentences, bounded waits.

- `call` retries what is worth retrying (5xx, 429, 409 "busy", timeouts, connection
  failures) and turns the rest into `CloudError` sentences. Quota errors are never
  retried. Exceptions are raised `from None`: an SDK exception can carry request
  values (Nova echoes invalid user-data, which holds passwords) and must never reach
  a log line through a traceback.
- `wait_for` polls with backoff up to a deadline and says what it waits for, both in
  the log and to whoever registered with `reporting` (the operation's description).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import requests
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as os_exc

from broker.cloud.base import CloudError, TransientCloudError
from broker.metrics import instruments

log = logging.getLogger("broker.cloud.openstack")

T = TypeVar("T")

_QUOTA = re.compile(r"quota|overquota|overlimit|limit exceeded|exceeds allowed", re.I)
_NO_ADDRESSES = re.compile(r"IpAddressGenerationFailure|No more IP addresses", re.I)


class WaitTimeout(CloudError):
    """A bounded wait ran out (callers escalate or re-raise with their own words)."""


@dataclass(frozen=True)
class Verdict:
    """What a failed OpenStack call means: retry it or not, and in which words."""

    transient: bool
    text: str
    status: int | None = None
    quota: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    # Seconds: the budget of one call's retries, and the backoff between its attempts.
    budget: float = 60.0
    base_delay: float = 0.5
    max_delay: float = 8.0


# --- secrets never leave ------------------------------------------------------------
def scrub(text: str, secrets: Sequence[str] = ()) -> str:
    """One short line without request values or known secrets."""
    # Nova's input validation echoes the offending value ("... Value: <user_data>").
    text = re.sub(r"Value: .*", "Value: (not shown)", text, flags=re.S)
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _details(exc: os_exc.HttpException) -> str:
    details = exc.details if isinstance(exc.details, str) and exc.details else ""
    if not details and exc.response is not None:
        details = exc.response.reason or ""
    return details


def classify(exc: BaseException, secrets: Sequence[str] = ()) -> Verdict | None:
    """None: not an OpenStack failure (a bug), let it propagate as it is."""
    if isinstance(exc, ks_exc.ConnectTimeout | requests.Timeout):
        return Verdict(True, "OpenStack did not answer in time")
    if isinstance(exc, ks_exc.ConnectFailure | ks_exc.UnknownConnectionError
                  | requests.ConnectionError):
        return Verdict(True, "cannot connect to OpenStack")
    if isinstance(exc, ks_exc.DiscoveryFailure):
        return Verdict(True, "OpenStack's version discovery failed: "
                       + scrub(str(exc), secrets))
    if isinstance(exc, ks_exc.Unauthorized):
        return Verdict(False, "OpenStack refused the credentials", 401)
    if isinstance(exc, ks_exc.HttpError):
        code = exc.http_status
        return Verdict(code is None or code >= 500 or code == 429,
                       f"OpenStack answered {code}: {scrub(exc.message or '', secrets)}", code)
    if isinstance(exc, os_exc.HttpException):
        status = exc.status_code
        text = scrub(_details(exc), secrets)
        request_id = getattr(exc, "request_id", None)
        where = f" (request {request_id})" if request_id else ""
        if status is None or status >= 500 or status == 429:
            return Verdict(True, f"OpenStack answered {status or 'an error'}: {text}{where}",
                           status)
        if status == 413 or (status in (403, 409) and _QUOTA.search(text)):
            return Verdict(False, f"quota exceeded: {text}{where}", status, quota=True)
        if status == 409 and _NO_ADDRESSES.search(text):
            return Verdict(False, f"no free address left: {text}{where}", status)
        if status == 409:
            return Verdict(True, f"OpenStack answered 409 conflict: {text}{where}", status)
        if status == 403:
            return Verdict(False, f"not allowed (does the OpenStack user have the role "
                           f"this needs?): {text}{where}", status)
        if status == 404:
            return Verdict(False, f"not found: {text}{where}", status)
        return Verdict(False, f"OpenStack refused the request ({status}): {text}{where}",
                       status)
    if isinstance(exc, os_exc.SDKException | ks_exc.ClientException):
        return Verdict(False, scrub(str(exc), secrets) or type(exc).__name__)
    return None


def call(what: str, fn: Callable[[], T], policy: RetryPolicy, *,
         secrets: Sequence[str] = (), retry_conflicts: bool = True,
         sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `fn`, retrying transient failures with backoff for up to `policy.budget`."""
    start = time.monotonic()
    delay = policy.base_delay
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as exc:
            verdict = classify(exc, secrets)
            if verdict is None:
                raise
            instruments.cloud_error(what)
            transient = verdict.transient and (retry_conflicts or verdict.status != 409)
            elapsed = time.monotonic() - start
            if transient and elapsed + delay <= policy.budget:
                log.warning("%s: %s; trying again in %.1f s (attempt %d)",
                            what, verdict.text, delay, attempt)
                sleep(delay)
                delay = min(policy.max_delay, delay * 2)
                continue
            if transient:
                raise TransientCloudError(
                    f"{what}: {verdict.text} (still failing after {attempt} attempts "
                    f"in {elapsed:.0f} s)") from None
            raise CloudError(f"{what}: {verdict.text}") from None


# --- reporting waits ----------------------------------------------------------------------
_reporter = threading.local()


@contextmanager
def reporting(callback: Callable[[str], None]) -> Iterator[None]:
    """Send what the driver waits for to `callback` (e.g. an operation's `progress`).

    Thread-local, so one worker thread's operation never hears another's waits."""
    previous = getattr(_reporter, "callback", None)
    _reporter.callback = callback
    try:
        yield
    finally:
        _reporter.callback = previous


def report(message: str) -> None:
    log.info("%s", message)
    callback = getattr(_reporter, "callback", None)
    if callback is not None:
        try:
            callback(message)
        except Exception:  # a progress line must never break the cloud call
            log.warning("could not record progress: %s", message)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, *,
             interval: float = 0.5, max_interval: float = 5.0, quiet: bool = False,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Poll `probe` until it returns something other than None, for at most `timeout`.

    `what` completes "waiting for ...": e.g. "server pgha-x-1 to become ACTIVE"."""
    if not quiet:
        report(f"waiting up to {timeout:.0f} s for {what}")
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        result = probe()
        if result is not None:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        sleep(min(delay, remaining))
        delay = min(max_interval, delay * 1.5)
