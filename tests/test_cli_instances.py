"""`broker instances list|show`: what an operator sees, from the store and live nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from broker.cli.instances import list_instances, show_instance
from broker.cloud.local import LocalCloud
from broker.operations import bindings
from harness.workflows import deprovision, instance, make_engine, make_runtime, provision

pytestmark = pytest.mark.e2e
KEY = Fernet.generate_key().decode()


def test_list_and_show_an_ha_sync_instance(local_cloud: LocalCloud, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    runtime = make_runtime(f"sqlite:///{tmp_path / 'state.sqlite3'}", KEY, local_cloud)
    engine = make_engine(runtime)
    assert list_instances(runtime) == 0
    assert "no instances" in capsys.readouterr().out
    instance_id = provision(runtime, engine, "ha-sync")
    inst = instance(runtime, instance_id)
    primary, standby = inst.primary(), inst.standby()
    assert primary is not None and standby is not None

    assert list_instances(runtime) == 0
    out = capsys.readouterr().out
    assert instance_id in out and "ha-sync" in out and "ready" in out
    assert inst.service_address and inst.service_address in out

    assert show_instance(runtime, instance_id, as_json=False) == 0
    out = capsys.readouterr().out
    assert f"netns pgha-{primary.server_id}" in out
    assert f"server {standby.server_id}" in out and "az2" in out
    assert "replication: streaming, sync, lag " in out
    assert "provision" in out and "succeeded" in out

    assert show_instance(runtime, instance_id, as_json=True) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"] == "ha-sync" and info["state"] == "ready"
    nodes = {n["role"]: n for n in info["nodes"]}
    assert nodes["primary"]["availability_zone"] == "az1"
    assert nodes["standby"]["availability_zone"] == "az2"
    assert nodes["standby"]["replication"]["sync_state"] == "sync"
    assert nodes["primary"]["server"]["netns"] == f"pgha-{primary.server_id}"
    assert nodes["primary"]["server"]["host"] == "az1-host-a"  # the hypervisor it runs on
    assert nodes["standby"]["server"]["host"] == "az2-host-a"
    assert [op["kind"] for op in info["operations"]] == ["provision"]
    assert info["failovers"] == []
    assert inst.admin_password_enc not in json.dumps(info)

    # A primary that does not answer is reported, not a crash.
    local_cloud.stop_server(primary.server_id or "")
    assert show_instance(runtime, instance_id, as_json=False) == 0
    out = capsys.readouterr().out
    assert "replication      unreachable" in out and "status SHUTOFF" in out
    # ... and a bind meanwhile is refused as "try again" (422), its row left to finish.
    with pytest.raises(bindings.InstanceNotReady, match="does not answer"):
        bindings.create_binding(runtime, instance_id, "b1", app_guid=None, bind_resource={},
                                parameters={})
    assert bindings.get_credentials(runtime, instance_id, "b1") is None

    deprovision(runtime, engine, instance_id)
    assert show_instance(runtime, "no-such-instance", as_json=False) == 1
    runtime.store.dispose()
