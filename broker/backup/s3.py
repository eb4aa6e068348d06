"""Backup repositories in S3-compatible object storage (BROKER_BACKUP_S3_*): one
bucket, each instance's repository under `<prefix>/<stanza>`; TLS verified (against
BROKER_BACKUP_S3_CA_FILE when set, else the node's system CAs)."""

from __future__ import annotations

from broker.config import S3Settings


def repository_path(s3: S3Settings, stanza: str) -> str:
    return f"{s3.prefix.rstrip('/')}/{stanza}"


def repository_options(s3: S3Settings, stanza: str) -> dict[str, str]:
    """pgBackRest's repo1-* options of the stanza's repository (its credentials
    included: the guest keeps them in a 0600 file, never on a command line)."""
    return {
        "repo1-type": "s3",
        "repo1-path": repository_path(s3, stanza),
        "repo1-s3-bucket": s3.bucket,
        "repo1-s3-endpoint": s3.endpoint,
        "repo1-storage-port": str(s3.port),
        "repo1-s3-region": s3.region,
        "repo1-s3-uri-style": s3.uri_style,
        "repo1-s3-key": s3.key,
        "repo1-s3-key-secret": s3.secret,
        # Each object is a round trip: small files go into bundles.
        "repo1-bundle": "y",
    }
