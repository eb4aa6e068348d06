"""The local cloud's typed records keep the state.json a running broker already has."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from broker.cloud.base import ServerStatus
from broker.cloud.local.records import PortRecord, RecordStore, by_name

# As the broker wrote it before the records had types (a tagless port included).
EXISTING = {
    "servers": {"s1": {"id": "s1", "name": "pgha-i-n1", "availability_zone": "az1",
                       "flavor": "f", "image": "img", "management_port_id": "p1",
                       "volume_id": "v1", "status": "SHUTOFF", "tags": {"pgha-instance": "i"}}},
    "ports": {"p1": {"id": "p1", "name": "pgha-i-n1", "purpose": "management",
                     "address": "10.9.0.2", "device_id": "s1", "tags": {}},
              "p2": {"id": "p2", "name": "pgha-i-service", "purpose": "service",
                     "address": "10.9.0.3", "device_id": None}},
    "volumes": {"v1": {"id": "v1", "name": "pgha-i-n1", "size_gb": 1,
                       "availability_zone": "az1", "volume_type": None,
                       "attached_to": "s1", "tags": {"pgha-instance": "i"}}},
}


def test_records_read_and_write_the_existing_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps(EXISTING))
    store = RecordStore(tmp_path)
    with store.locked() as records:
        server = records.servers["s1"]
        assert server.status is ServerStatus.SHUTOFF
        assert records.volumes["v1"].attached_to == "s1"
        assert records.ports["p2"].tags == {} and records.ports["p2"].device_id is None
        assert by_name(records.ports, "pgha-i-service") is records.ports["p2"]
        server.status = ServerStatus.ACTIVE
        records.ports["p3"] = PortRecord(id="p3", name="pgha-j-service", purpose="service",
                                         address="10.9.0.4")

    written = json.loads((tmp_path / "state.json").read_text())
    expected = json.loads(json.dumps(EXISTING))
    expected["servers"]["s1"]["status"] = "ACTIVE"
    expected["servers"]["s1"]["host"] = ""     # made before hosts existed: on none
    expected["hosts_down"] = []
    expected["ports"]["p2"]["tags"] = {}
    expected["ports"]["p3"] = {"id": "p3", "name": "pgha-j-service", "purpose": "service",
                               "address": "10.9.0.4", "device_id": None, "tags": {}}
    assert written == expected
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == 0o600
    assert store.read().servers["s1"].status is ServerStatus.ACTIVE


def test_a_failed_change_is_not_saved(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps(EXISTING))
    store = RecordStore(tmp_path)
    with pytest.raises(RuntimeError), store.locked() as records:
        del records.servers["s1"]
        raise RuntimeError("the step failed")
    assert json.loads((tmp_path / "state.json").read_text()) == EXISTING
