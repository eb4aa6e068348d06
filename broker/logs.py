"""Logging: one line per event, and a last line of defence against secrets.

Code never logs a secret on purpose; `RedactSecrets` also masks anything shaped
like one (URI passwords, `password=...`, Basic credentials) in case a library does.
`OneLine` escapes every control character of the finished line (the message, an
exception's traceback, a library's text alike), so that nothing a client sends,
percent-decoded paths included, can start a forged log line or reach a terminal raw.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

_PATTERNS = [
    (re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)(password\s*[=:]\s*['\"]?)[^'\"\s&;,]+"), r"\1***"),
    (re.compile(r"(?i)(authorization:\s*basic\s+)\S+"), r"\1***"),
    (re.compile(r"(?i)(PASSWORD\s+)'[^']*'"), r"\1'***'"),
    # A status page's URL holds its token (broker/web/dashboard.py).
    (re.compile(r"(/dashboard/[^/\s\"?]*/)[^/\s\"?]+"), r"\1***"),
]

# C0, DEL, C1; the Unicode line and paragraph separators (str.splitlines() and some
# log viewers break lines there); bidirectional overrides, which reorder what a reader
# sees; lone surrogates (undecodable bytes under surrogateescape, or a JSON "\ud800").
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")

LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with every unsafe character written as `\\xNN` or `\\uNNNN`."""
    return _UNSAFE.sub(_escaped, text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class OneLine(logging.Formatter):
    """Formats with `inner`, then escapes the whole line: one record, one line."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter(LOG_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return escape_control(self._inner.format(record))


def one_line_handlers(logger: logging.Logger) -> None:
    """Wrap the formatter of every handler of `logger` (one set up by a library) in
    `OneLine`, and mask secrets there too (an access log line holds the request's URL)."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, OneLine):
            handler.setFormatter(OneLine(handler.formatter))
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


def make_handler(stream: TextIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLine())
    handler.addFilter(RedactSecrets())
    return handler


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger()
    root.handlers[:] = [make_handler(sys.stderr)]
    root.setLevel(level)
    # Third-party chatter that could echo request details at DEBUG.
    for noisy in ("urllib3", "keystoneauth", "openstack", "werkzeug", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
