"""Settings and catalog: what an operator sees when they get them wrong."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker.catalog import load_catalog, parse_catalog, validate_parameters
from broker.config import DEFAULT_CATALOG, ConfigError, load_settings
from broker.crypto import Vault, load_or_create_key, new_password

ENV = {"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": "/tmp/x"}


def test_broker_refuses_to_start_without_credentials() -> None:
    with pytest.raises(ConfigError, match="BROKER_USERNAME and BROKER_PASSWORD"):
        load_settings({"BROKER_STATE_DIR": "/tmp/x"})


def test_cli_says_why_it_refuses_to_start(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "broker", "serve"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin",
                                         "BROKER_STATE_DIR": str(tmp_path)}, check=False)
    assert out.returncode == 2
    assert "BROKER_USERNAME and BROKER_PASSWORD must be set" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PORT", "http", "PORT must be a TCP port number"),
    ("BROKER_CLOUD", "aws", "BROKER_CLOUD must be 'local' or 'openstack'"),
    ("BROKER_LOCAL_NETWORK", "8.8.8.0/24", "must be a private network"),
    ("BROKER_LOCAL_NETWORK", "10.0.0.1/24", "BROKER_LOCAL_NETWORK must be an IPv4 CIDR"),
    ("BROKER_MONITOR_INTERVAL", "-1", "must be positive"),
])
def test_bad_settings_name_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({**ENV, name: value})


def test_vcap_services_postgres_scheme_becomes_postgresql() -> None:
    vcap = ('{"postgres": [{"name": "broker-state", "tags": ["postgresql"], '
            '"credentials": {"uri": "postgres://u:p@db.example:5432/state"}}]}')
    settings = load_settings({**ENV, "VCAP_SERVICES": vcap})
    assert settings.database_url == "postgresql://u:p@db.example:5432/state"


def test_default_state_store_is_sqlite_in_the_state_dir() -> None:
    settings = load_settings(ENV)
    assert settings.database_url == "sqlite:////tmp/x/broker.sqlite3"
    assert settings.cloud == "local"


def test_shipped_catalog_has_three_plans_with_distinct_zones() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    names = {p.name: p for s in catalog.services for p in s.plans}
    assert set(names) == {"standalone", "ha", "ha-sync"}
    assert names["ha-sync"].cloud.replication == "sync"
    assert names["ha"].cloud.replication == "async"
    assert names["standalone"].cloud.nodes == 1
    osb = catalog.osb()
    service = osb["services"][0]
    assert service["name"] == "postgresql-ha"
    assert service["metadata"]["shareable"] is True
    assert set(service["tags"]) == {"postgresql", "relational"}
    for plan in service["plans"]:
        assert "cloud" not in plan  # the broker's build settings stay private
        assert plan["maintenance_info"]["version"]
        assert plan["maximum_polling_duration"] > 0


def _doc() -> dict:  # type: ignore[type-arg]
    return copy.deepcopy(yaml.safe_load(DEFAULT_CATALOG.read_text()))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["services"][0]["plans"][1]["cloud"].update(replication="semi"),
     r"services\[0\]\.plans\[1\]\.cloud\.replication: 'semi' is not one of"),
    (lambda d: d["services"][0]["plans"][0].pop("maintenance_info"),
     r"services\[0\]\.plans\[0\]: 'maintenance_info' is a required property"),
    (lambda d: d["services"][0]["plans"][2]["cloud"].update(availability_zones=["az1"]),
     r"services\[0\]\.plans\[2\]\.cloud\.availability_zones: an HA plan needs two zones"),
    (lambda d: d["services"][0]["plans"][2].update(id="not-a-uuid"),
     r"services\[0\]\.plans\[2\]\.id: 'not-a-uuid' is not a UUID"),
    (lambda d: d["services"][0]["plans"][1]["maintenance_info"].update(version="one"),
     r"services\[0\]\.plans\[1\]\.maintenance_info\.version"),
])
def test_bad_catalog_names_the_field(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    doc = _doc()
    mutate(doc)
    with pytest.raises(ConfigError, match=message):
        parse_catalog(doc)


def test_broker_stops_on_a_bad_catalog_with_the_field(tmp_path: Path) -> None:
    doc = _doc()
    doc["services"][0]["plans"][0]["cloud"]["nodes"] = 3
    path = tmp_path / "catalog.yml"
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "broker", "db", "upgrade"], capture_output=True,
                         text=True, check=False,
                         env={"PATH": "/usr/bin:/bin", "BROKER_CATALOG": str(path),
                              "BROKER_STATE_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "services[0].plans[0].cloud.nodes: 3 is not one of [1, 2]" in out.stderr


def test_parameters_are_checked_against_the_plan_schema() -> None:
    plan = load_catalog(DEFAULT_CATALOG).plan_by_name("ha-sync")
    assert validate_parameters(plan.provision_schema, {"extensions": ["pgcrypto"]}) is None
    assert "unknown parameter 'size'" in (validate_parameters(plan.provision_schema,
                                                              {"size": 3}) or "")
    error = validate_parameters(plan.provision_schema, {"statement_timeout_ms": "10s"})
    assert error is not None and "statement_timeout_ms" in error
    assert validate_parameters(plan.provision_schema, [1]) == "parameters must be a JSON object"


def test_secrets_round_trip_and_key_file_is_private(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path, None)
    assert (tmp_path / "encryption.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path, None) == key  # made once
    vault = Vault(key)
    secret = new_password()
    token = vault.encrypt(secret)
    assert secret not in token
    assert vault.decrypt(token) == secret
    other = Vault(load_or_create_key(tmp_path / "other", None))
    with pytest.raises(ConfigError, match="not the key the secrets were written with") as info:
        other.decrypt(token)
    assert secret not in str(info.value)


def test_bad_encryption_key_is_explained() -> None:
    with pytest.raises(ConfigError, match="BROKER_ENCRYPTION_KEY is not a valid key"):
        Vault("short")


def _key_in(state_dir: str) -> str:
    return load_or_create_key(Path(state_dir), None)


def test_processes_starting_together_share_one_key(tmp_path: Path) -> None:
    """web and worker start at once: both must end up with the same, whole key."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(8) as pool:
        for round_ in range(20):
            state_dir = tmp_path / str(round_)
            keys = pool.map(_key_in, [str(state_dir)] * 8)
            assert len(set(keys)) == 1 and keys[0], keys
            assert (state_dir / "encryption.key").read_text().strip() == keys[0]
            assert [p.name for p in state_dir.iterdir()] == ["encryption.key"]
