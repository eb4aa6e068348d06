"""Secrets at rest: every password the broker stores goes through `Vault`.

The key is a Fernet key (AES-128-CBC + HMAC-SHA256) from BROKER_ENCRYPTION_KEY.
The embedded default generates one in the state directory with mode 0600.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import string
import tempfile
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from broker.config import ConfigError

KEY_FILE = "encryption.key"
_ALPHABET = string.ascii_letters + string.digits


class Vault:
    def __init__(self, key: str | bytes) -> None:
        try:
            self._fernet = Fernet(key.encode() if isinstance(key, str) else key)
        except ValueError:
            raise ConfigError(
                "BROKER_ENCRYPTION_KEY is not a valid key: it must be 32 url-safe "
                "base64-encoded bytes (python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())')"
            ) from None
        self._mac_key = hashlib.sha256(b"pgha-broker mac\0" + (
            key.encode() if isinstance(key, str) else key)).digest()

    def mac(self, purpose: str, message: str) -> str:
        """A URL-safe HMAC-SHA256 of `message` under a key derived from the broker's
        key: a per-object secret that needs no storage (e.g. a status page's token)."""
        digest = hmac.new(self._mac_key, f"{purpose}\0{message}".encode(),
                          hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            # Never include the token or the key in the message.
            raise ConfigError(
                "a stored secret cannot be decrypted: BROKER_ENCRYPTION_KEY is not the "
                "key the secrets were written with"
            ) from None


def load_or_create_key(state_dir: Path, configured: str | None) -> str:
    """The configured key, or the state directory's own (made once, mode 0600)."""
    if configured:
        return configured
    path = state_dir / KEY_FILE
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key().decode()
    # Written whole to a private temp file, then linked into place: two processes
    # starting at once never see a half-written key, and the first link wins.
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".key-")
    try:
        with os.fdopen(fd, "w") as handle:  # mkstemp makes it 0600
            handle.write(key + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_text().strip()
    finally:
        os.unlink(tmp)
    return key


def new_password(length: int = 32) -> str:
    """A password safe in URIs, conninfo strings and pg_hba-free of quoting trouble."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))
