"""Logging: one line per event, and a last line of defence against secrets.

Code never logs a secret on purpose; `RedactSecrets` also masks anything shaped
like one (URI passwords, `password=...`, Basic credentials) in case a library does.
"""

from __future__ import annotations

import logging
import re
import sys

_PATTERNS = [
    (re.compile(r"(\w+://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(?i)(password\s*[=:]\s*['\"]?)[^'\"\s&;,]+"), r"\1***"),
    (re.compile(r"(?i)(authorization:\s*basic\s+)\S+"), r"\1***"),
    (re.compile(r"(?i)(PASSWORD\s+)'[^']*'"), r"\1'***'"),
]


def redact(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter that could echo request details at DEBUG.
    for noisy in ("urllib3", "keystoneauth", "openstack", "werkzeug", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
