"""Backup repositories in S3-compatible object storage: each instance's repository is
`<prefix>/<stanza>` in a bucket; TLS verified (against BROKER_BACKUP_S3_CA_FILE when
set, else the system's CAs).

Where: a plan's `cloud.backups.object_storage` over BROKER_BACKUP_S3_* field by field;
the credentials always come from the environment. An instance's location is stored
when its first node is made (`backup_repositories.location`) and used from then on:
its archive, its backups, a restore from it and its deletion after the restore window
all find it there, whatever the catalog says later."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from sqlalchemy.orm import Session

from broker.backup import records
from broker.catalog import Catalog, Plan
from broker.config import ConfigError, S3Access, S3Settings, Settings

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
TIMEOUT_S = 30


class ObjectStorageError(Exception):
    """Object storage refused or could not be reached (the message says what it said)."""


LOCATION_FIELDS = ("endpoint", "port", "bucket", "region", "uri_style", "prefix")


def access(settings: Settings) -> S3Access | None:
    if settings.backup_s3_access is not None:
        return settings.backup_s3_access
    env = settings.backup_s3
    return S3Access(key=env.key, secret=env.secret, ca_pem=env.ca_pem) if env else None


def plan_storage(settings: Settings, plan: Plan | None) -> S3Settings | None:
    """The object storage of the plan's new repositories (None: the cloud's own)."""
    env = settings.backup_s3
    own = plan.cloud.backups.object_storage if plan is not None else None
    if own is None:
        return env
    merged = {name: getattr(own, name) if getattr(own, name) is not None
              else (getattr(env, name) if env is not None else None)
              for name in LOCATION_FIELDS}
    merged["port"] = merged["port"] or 443
    merged["region"] = merged["region"] or "us-east-1"
    merged["uri_style"] = merged["uri_style"] or "host"
    merged["prefix"] = merged["prefix"] or "/pgha"
    return at(merged, settings)


def check_plans(settings: Settings, catalog: Catalog) -> None:
    """At start: every plan that names object storage can reach it (ConfigError)."""
    for service in catalog.services:
        for plan in service.plans:
            own = plan.cloud.backups.object_storage
            if own is None:
                continue
            where = f"plan {plan.name}: cloud.backups.object_storage"
            env = settings.backup_s3
            for name in ("endpoint", "bucket"):
                if getattr(own, name) is None and env is None:
                    raise ConfigError(f"{where} has no {name} and BROKER_BACKUP_S3_ENDPOINT "
                                      "is not set")
            if access(settings) is None:
                raise ConfigError(f"{where} is set: BROKER_BACKUP_S3_KEY and "
                                  "BROKER_BACKUP_S3_SECRET must be too")


def location(storage: S3Settings | None) -> dict[str, Any]:
    """What is stored of a repository's place (no credentials); {}: the cloud's own."""
    return {name: getattr(storage, name) for name in LOCATION_FIELDS} if storage else {}


def at(place: dict[str, Any], settings: Settings) -> S3Settings | None:
    """The object storage of a stored location, with the environment's credentials."""
    if not place:
        return None
    creds = access(settings)
    if creds is None:
        raise ObjectStorageError(f"the repository is in bucket {place.get('bucket')} at "
                                 f"{place.get('endpoint')}: BROKER_BACKUP_S3_KEY and "
                                 "BROKER_BACKUP_S3_SECRET are not set")
    return S3Settings(**{name: place[name] for name in LOCATION_FIELDS}, key=creds.key,
                      secret=creds.secret, ca_pem=creds.ca_pem)


def instance_storage(session: Session, settings: Settings, catalog: Catalog,
                     instance_id: str, plan_id: str) -> S3Settings | None:
    """The instance's repository in object storage (None: the cloud's own): where it was
    put when first asked; the first time, where its plan puts new ones."""
    row = records.repository(session, instance_id)
    if row.location is None:
        row.location = location(plan_storage(settings, catalog.plan(plan_id)))
    return at(row.location, settings)


def repository_path(s3: S3Settings, stanza: str) -> str:
    return f"{s3.prefix.rstrip('/')}/{stanza}"


def repository_options(s3: S3Settings, stanza: str) -> dict[str, str]:
    """pgBackRest's repo1-* options of the stanza's repository (its credentials
    included: the guest keeps them in a 0600 file, never on a command line)."""
    return {
        **place_options(s3, stanza),
        "repo1-s3-key": s3.key,
        "repo1-s3-key-secret": s3.secret,
        # Each object is a round trip: small files go into bundles.
        "repo1-bundle": "y",
    }


def place_options(s3: S3Settings, stanza: str) -> dict[str, str]:
    """Where the repository is, without credentials: fit for a command line (a restore
    reads the source's repository with them, and its own configuration's keys)."""
    return {
        "repo1-type": "s3",
        "repo1-path": repository_path(s3, stanza),
        "repo1-s3-bucket": s3.bucket,
        "repo1-s3-endpoint": s3.endpoint,
        "repo1-storage-port": str(s3.port),
        "repo1-s3-region": s3.region,
        "repo1-s3-uri-style": s3.uri_style,
    }


@contextlib.contextmanager
def _client(s3: S3Settings) -> Iterator[Any]:
    """The broker's own S3 client, verified like the nodes' pgBackRest (the CA file
    when set, else the system's CAs)."""
    with tempfile.NamedTemporaryFile("w", suffix=".pem", prefix="pgha-s3-ca-") as ca:
        ca.write(s3.ca_pem)
        ca.flush()
        yield boto3.session.Session().client(
            "s3", endpoint_url=f"https://{s3.endpoint}:{s3.port}", region_name=s3.region,
            aws_access_key_id=s3.key, aws_secret_access_key=s3.secret,
            verify=ca.name if s3.ca_pem else True,
            config=botocore.config.Config(
                s3={"addressing_style": "path" if s3.uri_style == "path" else "virtual"},
                connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S,
                retries={"max_attempts": 3, "mode": "standard"}))


def delete_repository(s3: S3Settings, stanza: str) -> int:
    """Delete every object of the stanza's repository (a deleted instance's, after its
    restore window); how many. Nothing outside `<prefix>/<stanza>/` is touched."""
    prefix = repository_path(s3, stanza).lstrip("/") + "/"
    deleted = 0
    try:
        with _client(s3) as client:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=s3.bucket, Prefix=prefix, PaginationConfig={"PageSize": DELETE_BATCH})
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if not keys:
                    continue
                answer = client.delete_objects(Bucket=s3.bucket,
                                               Delete={"Objects": keys, "Quiet": True})
                errors = answer.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise ObjectStorageError(f"{len(errors)} objects not deleted, e.g. "
                                             f"{first.get('Key')}: {first.get('Code')} "
                                             f"{first.get('Message', '')}".strip())
                deleted += len(keys)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise ObjectStorageError(f"bucket {s3.bucket} at {s3.endpoint}:{s3.port}: "
                                 + " ".join(str(exc).split())) from None
    return deleted
