"""Where a plan's backup repositories go: `cloud.backups.object_storage` in the catalog
over BROKER_BACKUP_S3_*, field by field, with the credentials from the environment
only; a bad field or a plan that cannot reach its storage stops the broker with a
line that names it."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.backup import s3
from broker.catalog import parse_catalog
from broker.config import DEFAULT_CATALOG, ConfigError, load_settings

ENV = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": "/tmp/x"}
S3_ENV = {"BROKER_BACKUP_S3_ENDPOINT": "s3.example.org", "BROKER_BACKUP_S3_BUCKET": "shared",
          "BROKER_BACKUP_S3_KEY": "k", "BROKER_BACKUP_S3_SECRET": "s",
          "BROKER_BACKUP_S3_REGION": "RegionOne"}


def _doc(plan: int, storage: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = copy.deepcopy(yaml.safe_load(DEFAULT_CATALOG.read_text()))
    cloud = doc["services"][0]["plans"][plan]["cloud"]
    # The plans share one `backups` mapping through a YAML anchor: give this one its own.
    cloud["backups"] = {**cloud["backups"], "object_storage": storage}
    return doc


@pytest.mark.parametrize(("storage", "message"), [
    ({"endpoint": "swift.example.org:99999"},
     r"plans\[1\]\.cloud\.backups\.object_storage\.endpoint: port 99999 is not 1-65535"),
    ({"endpoint": "https://swift.example.org"},
     r"plans\[1\]\.cloud\.backups\.object_storage\.endpoint: 'https://swift.example.org' "
     "does not match"),
    ({"uri_style": "virtual"},
     r"plans\[1\]\.cloud\.backups\.object_storage\.uri_style: 'virtual' is not one of"),
    ({"bucket": "Bad_Bucket"},
     r"plans\[1\]\.cloud\.backups\.object_storage\.bucket: 'Bad_Bucket' does not match"),
    ({"key": "AKIA..."},
     r"plans\[1\]\.cloud\.backups\.object_storage: Additional properties are not allowed "
     r"\('key' was unexpected\)"),
])
def test_a_bad_object_storage_field_is_named(storage: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_catalog(_doc(1, storage))


def test_the_plan_wins_over_the_environment_field_by_field() -> None:
    catalog = parse_catalog(_doc(1, {"bucket": "ha-backups", "uri_style": "path",
                                     "prefix": "/tenants/ha/"}))
    settings = load_settings({**ENV, **S3_ENV})
    s3.check_plans(settings, catalog)
    ha = s3.plan_storage(settings, catalog.plan_by_name("ha"))
    assert ha is not None
    assert (ha.endpoint, ha.port, ha.bucket, ha.region, ha.uri_style, ha.prefix) == (
        "s3.example.org", 443, "ha-backups", "RegionOne", "path", "/tenants/ha")
    assert (ha.key, ha.secret) == ("k", "s")
    standalone = s3.plan_storage(settings, catalog.plan_by_name("standalone"))
    assert standalone is not None and standalone.bucket == "shared"
    # Stored, the location holds no credential; read back it gets the environment's.
    place = s3.location(ha)
    assert "k" not in place.values() and "s" not in place.values()
    assert s3.at(place, settings) == ha


def test_a_plan_of_its_own_needs_only_the_credentials_from_the_environment() -> None:
    catalog = parse_catalog(_doc(2, {"endpoint": "rgw.example.org:8443", "bucket": "sync"}))
    settings = load_settings({**ENV, "BROKER_BACKUP_S3_KEY": "k", "BROKER_BACKUP_S3_SECRET": "s"})
    s3.check_plans(settings, catalog)
    assert s3.plan_storage(settings, catalog.plan_by_name("standalone")) is None
    sync = s3.plan_storage(settings, catalog.plan_by_name("ha-sync"))
    assert sync is not None
    assert (sync.endpoint, sync.port, sync.bucket, sync.region, sync.uri_style) == (
        "rgw.example.org", 8443, "sync", "us-east-1", "host")
    with pytest.raises(ConfigError, match="BROKER_BACKUP_S3_KEY and BROKER_BACKUP_S3_SECRET "
                                          "are set together"):
        load_settings({**ENV, "BROKER_BACKUP_S3_KEY": "k"})


@pytest.mark.parametrize(("storage", "env", "message"), [
    ({"bucket": "ha-backups"}, {"BROKER_BACKUP_S3_KEY": "k", "BROKER_BACKUP_S3_SECRET": "s"},
     "plan ha: cloud.backups.object_storage has no endpoint and BROKER_BACKUP_S3_ENDPOINT "
     "is not set"),
    ({"endpoint": "rgw.example.org", "bucket": "ha-backups"}, {},
     "plan ha: cloud.backups.object_storage is set: BROKER_BACKUP_S3_KEY and "
     "BROKER_BACKUP_S3_SECRET must be too"),
])
def test_the_broker_refuses_a_plan_that_cannot_reach_its_storage(
        tmp_path: Path, storage: dict[str, Any], env: dict[str, str], message: str) -> None:
    path = tmp_path / "catalog.yml"
    path.write_text(yaml.safe_dump(_doc(1, storage)))
    out = subprocess.run([sys.executable, "-m", "broker", "db", "upgrade"], capture_output=True,
                         text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "BROKER_CATALOG": str(path),
                              "BROKER_STATE_DIR": str(tmp_path), **env})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
