"""Local cloud figures: primary boot, standby boot (base backup), service port move.

Run as root: .venv/bin/python benchmarks/local_cloud.py [ROUNDS]
Uses its own bridge and /24 (like the tests) and removes everything afterwards.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker.cloud.base import ServerSpec
from broker.guest.bootstrap import GuestConfig
from broker.pg import connection, replication, tenants
from harness.machine import make_local_cloud

PW = "bench-admin-pw"
REPL = "bench-repl-pw"


def main(rounds: int) -> None:
    primary_boot: list[float] = []
    primary_ready: list[float] = []
    standby_boot: list[float] = []
    standby_streaming: list[float] = []
    move: list[float] = []
    move_to_query: list[float] = []
    with make_local_cloud() as cloud:
        service = cloud.create_port("bench-service", "service", {})
        for r in range(rounds):
            pa = cloud.create_port(f"bench-{r}-a", "management", {})
            pb = cloud.create_port(f"bench-{r}-b", "management", {})
            va = cloud.create_volume(f"bench-{r}-a", 1, "az1", None, {})
            vb = cloud.create_volume(f"bench-{r}-b", 1, "az2", None, {})
            common = {"instance_id": "bench", "admin_password": PW,
                      "replication_password": REPL, "admin_cidrs": (cloud.broker_address,),
                      "peer_addresses": (pa.address, pb.address),
                      "app_cidrs": (cloud.broker_address,)}
            t0 = time.monotonic()
            a = cloud.create_server(ServerSpec(
                name=f"bench-{r}-a", availability_zone="az1", flavor="", image="",
                management_port_id=pa.id, volume_id=va.id,
                guest=GuestConfig(node_id="a", role="primary", **common)))  # type: ignore[arg-type]
            primary_boot.append(time.monotonic() - t0)
            connection.wait_ready(pa.address, PW)
            primary_ready.append(time.monotonic() - t0)
            conn = connection.connect(pa.address, PW)
            tenants.ensure_cluster_objects(conn, replication_password=REPL)
            replication.ensure_slot(conn, "slot_b")
            t0 = time.monotonic()
            b = cloud.create_server(ServerSpec(
                name=f"bench-{r}-b", availability_zone="az2", flavor="", image="",
                management_port_id=pb.id, volume_id=vb.id,
                guest=GuestConfig(node_id="b", role="standby", application_name="node_b",
                                  primary_address=pa.address, slot_name="slot_b",
                                  **common)))  # type: ignore[arg-type]
            standby_boot.append(time.monotonic() - t0)
            replication.wait_streaming(conn, "node_b")
            standby_streaming.append(time.monotonic() - t0)
            conn.close()
            cloud.attach_port(service.id, a.id)
            for target, source in ((b, a), (a, b)) * 3:
                t0 = time.monotonic()
                cloud.detach_port(service.id, source.id)
                cloud.attach_port(service.id, target.id)
                move.append(time.monotonic() - t0)
                connection.wait_ready(service.address, PW)
                move_to_query.append(time.monotonic() - t0)
            cloud.detach_port(service.id, a.id)
            for server in (a, b):
                cloud.delete_server(server.id)
    for label, values in (("primary boot (create_server)", primary_boot),
                          ("primary boot to first connection", primary_ready),
                          ("standby boot incl. base backup (create_server)", standby_boot),
                          ("standby boot to streaming", standby_streaming),
                          ("service port move (detach + attach)", move),
                          ("service port move to first query via service address",
                           move_to_query)):
        print(f"{label:58} median {statistics.median(values) * 1000:7.1f} ms  "
              f"min {min(values) * 1000:7.1f}  max {max(values) * 1000:7.1f}  n={len(values)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
