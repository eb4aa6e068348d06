"""broker.pg (connection, hba, tenants, roles, replication) against one real PostgreSQL
node booted in the local cloud."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import psycopg2
import pytest
from psycopg2.extensions import connection as Connection

from broker.cloud.base import ServerSpec
from broker.cloud.local import LocalCloud
from broker.guest.bootstrap import GuestConfig
from broker.pg import connection, hba, replication, roles, tenants, tls
from broker.pg.names import APP_DATABASE
from harness.machine import make_local_cloud

pytestmark = pytest.mark.e2e

ADMIN_PW = "admin-pw-7f3a"
REPL_PW = "repl-pw-91c2"


@dataclass
class Node:
    cloud: LocalCloud
    address: str
    conn: Connection      # postgres db
    appdb: Connection
    ca_pem: str


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with make_local_cloud() as cloud:
        port = cloud.create_port("pgha-t-a", "management", {})
        volume = cloud.create_volume("pgha-t-a", 1, "az1", None, {})
        ca = tls.new_ca("t")
        cert = tls.issue_node_cert(ca.cert_pem, ca.key_pem, node_id="a",
                                   addresses=[port.address], days=1)
        config = GuestConfig(
            instance_id="t", node_id="a", role="primary", admin_password=ADMIN_PW,
            replication_password=REPL_PW, admin_cidrs=(cloud.broker_address,),
            peer_addresses=(port.address,), app_cidrs=(cloud.broker_address,),
            tls_ca_cert=ca.cert_pem, tls_cert=cert.cert_pem, tls_key=cert.key_pem,
            tls_issued_at=cert.issued_at)
        cloud.create_server(ServerSpec(name="pgha-t-a", availability_zone="az1",
                                       flavor="local", image="local",
                                       management_port_id=port.id, volume_id=volume.id,
                                       guest=config))
        connection.wait_ready(port.address, ADMIN_PW, timeout=30, ca_pem=ca.cert_pem)
        conn = connection.connect(port.address, ADMIN_PW, ca_pem=ca.cert_pem)
        tenants.ensure_cluster_objects(conn, replication_password=REPL_PW)
        tenants.ensure_cluster_objects(conn, replication_password=REPL_PW)  # idempotent
        appdb = connection.connect(port.address, ADMIN_PW, dbname=APP_DATABASE,
                                   ca_pem=ca.cert_pem)
        try:
            yield Node(cloud, port.address, conn, appdb, ca.cert_pem)
        finally:
            appdb.close()
            conn.close()


def login(node: Node, user: str, password: str, dbname: str = "appdb") -> Connection:
    conn = psycopg2.connect(host=node.address, user=user, password=password, dbname=dbname,
                            connect_timeout=5, sslmode="verify-full",
                            sslrootcert=tls.ca_file(node.ca_pem))
    conn.autocommit = True
    return conn


def scalar(conn: Connection, query: str) -> object:
    with conn.cursor() as cur:
        cur.execute(query)
        row = cur.fetchone()
    assert row is not None
    return row[0]


def test_binding_role_name_is_stable_and_short() -> None:
    name = roles.binding_role_name("binding-guid-1")
    assert name == roles.binding_role_name("binding-guid-1")
    assert name.startswith("b_") and len(name) == 18
    assert name != roles.binding_role_name("binding-guid-2")


def test_render_hba_allows_only_what_is_needed() -> None:
    lines = hba.render_hba(admin_cidrs=["10.1.0.1"], peer_addresses=["10.1.0.2", "10.1.0.3"],
                           app_cidrs=["10.1.0.0/24"])
    rules = [line.split() for line in lines if not line.startswith("#")]
    # The unix socket admits only the superuser, by password (pgBackRest's backups).
    assert [r for r in rules if r[0] == "local"] == [["local", "all", "postgres", "scram-sha-256"]]
    assert ["hostssl", "all", "postgres", "10.1.0.1/32", "scram-sha-256"] in rules
    assert ["hostssl", "replication", "pgha_replicator", "10.1.0.3/32", "scram-sha-256"] in rules
    assert ["hostssl", "appdb", "+app_owner", "10.1.0.0/24", "scram-sha-256"] in rules
    assert ["hostssl", "appdb", "+app_reader", "10.1.0.0/24", "scram-sha-256"] in rules
    # Nothing for "all" users, nothing trusting, nothing in cleartext over the network.
    assert not [r for r in rules if r[2] == "all" or r[-1] == "trust"]
    assert {r[0] for r in rules} == {"hostssl", "local"}
    # A node made before TLS has no certificate: its lines stay `host` until rotated.
    old = hba.render_hba(admin_cidrs=["10.1.0.1"], peer_addresses=[], app_cidrs=[], tls=False)
    assert {line.split()[0] for line in old if not line.startswith("#")} == {"host", "local"}
    with pytest.raises(ValueError, match="not an IP"):
        hba.render_hba(admin_cidrs=["x; host all all 0.0.0.0/0 trust"], peer_addresses=[],
                       app_cidrs=[])


def test_wrong_password_error_carries_no_secret(node: Node) -> None:
    with pytest.raises(connection.PgNotReady) as failure:
        connection.wait_ready(node.address, "wrong-secret-5501", timeout=0.3)
    assert "wrong-secret-5501" not in str(failure.value)
    assert "password authentication failed" in str(failure.value)


def test_read_write_binding_lifecycle(node: Node) -> None:
    role = roles.binding_role_name("rw-binding")
    roles.create_binding_role(node.conn, role, "first-pw-1")
    roles.create_binding_role(node.conn, role, "bind-pw-1")  # idempotent, new password
    app = login(node, role, "bind-pw-1")
    with app.cursor() as cur:
        cur.execute("CREATE TABLE orders (id int)")
        cur.execute("INSERT INTO orders VALUES (1)")
    assert scalar(node.appdb, "SELECT tableowner FROM pg_tables WHERE tablename = 'orders'"
                  ) == "app_owner"
    # Only the application database, never the others.
    with pytest.raises(psycopg2.OperationalError):
        login(node, role, "bind-pw-1", dbname="postgres")
    with pytest.raises(psycopg2.OperationalError):
        login(node, role, "first-pw-1")

    # Unbind: the open session ends, the table stays, the password no longer works.
    roles.drop_binding_role(node.conn, role)
    roles.drop_binding_role(node.conn, role)  # idempotent
    with pytest.raises(psycopg2.Error):
        scalar(app, "SELECT 1")
    app.close()
    assert scalar(node.appdb, "SELECT count(*) FROM public.orders") == 1
    with pytest.raises(psycopg2.OperationalError):
        login(node, role, "bind-pw-1")

    # A later binding sees and writes the same tables.
    other = roles.binding_role_name("rw-binding-2")
    roles.create_binding_role(node.conn, other, "bind-pw-2")
    app2 = login(node, other, "bind-pw-2")
    with app2.cursor() as cur:
        cur.execute("INSERT INTO orders VALUES (2)")
    app2.close()
    roles.drop_binding_role(node.appdb, other)


def test_read_only_binding_reads_but_never_writes(node: Node) -> None:
    with node.appdb.cursor() as cur:
        cur.execute("SET ROLE app_owner")  # as the app makes its tables
        cur.execute("CREATE TABLE IF NOT EXISTS public.catalog (id int)")
        cur.execute("INSERT INTO public.catalog VALUES (7)")
        cur.execute("RESET ROLE")
    role = roles.binding_role_name("ro-binding")
    roles.create_binding_role(node.conn, role, "ro-pw-1", read_only=True)
    app = login(node, role, "ro-pw-1")
    assert scalar(app, "SELECT max(id) FROM catalog") == 7
    for attempt in ("INSERT INTO catalog VALUES (8)", "SET ROLE app_owner",
                    "SET default_transaction_read_only = off; INSERT INTO catalog VALUES (8)",
                    "SELECT count(*) FROM pg_authid"):
        with pytest.raises(psycopg2.Error):
            scalar(app, attempt + "; SELECT 1")
    app.close()
    roles.drop_binding_role(node.conn, role)


def test_set_hba_replaces_and_keeps_a_working_file(node: Node) -> None:
    cloud = node.cloud
    lines = hba.render_hba(admin_cidrs=[cloud.broker_address],
                           peer_addresses=[node.address, "10.99.0.9"],
                           app_cidrs=[cloud.broker_address])
    hba.set_hba(node.conn, lines)
    hba.set_hba(node.conn, lines)  # idempotent
    with node.conn.cursor() as cur:
        cur.execute("SELECT address FROM pg_hba_file_rules WHERE 'replication' = ANY(database)")
        assert {r[0] for r in cur.fetchall()} == {node.address, "10.99.0.9"}
    with pytest.raises(ValueError, match="errors"):
        hba.set_hba(node.conn, ["host all postgres 10.0.0.1/99 scram-sha-256"])
    connection.wait_ready(node.address, ADMIN_PW, timeout=5,
                          ca_pem=node.ca_pem)  # the old file still lets us in


def test_settings_extensions_slots_and_promote_on_a_primary(node: Node) -> None:
    tenants.set_database_setting(node.conn, "appdb", "statement_timeout", "1500")
    with node.conn.cursor() as cur:
        cur.execute("SELECT setconfig FROM pg_db_role_setting s JOIN pg_database d "
                    "ON d.oid = s.setdatabase WHERE d.datname = 'appdb' AND s.setrole = 0")
        assert cur.fetchone() == (['search_path="$user", public, extensions',
                                   "statement_timeout=1500"],)
    tenants.set_database_setting(node.conn, "appdb", "statement_timeout", None)
    tenants.ensure_extensions(node.appdb, ["pgcrypto"])
    tenants.ensure_extensions(node.appdb, ["pgcrypto"])
    assert scalar(node.appdb, "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n "
                  "ON n.oid = e.extnamespace WHERE extname = 'pgcrypto'") == "extensions"
    replication.ensure_slot(node.conn, "slot_x")
    replication.ensure_slot(node.conn, "slot_x")
    assert scalar(node.conn, "SELECT restart_lsn IS NOT NULL FROM pg_replication_slots "
                  "WHERE slot_name = 'slot_x'") is True
    replication.drop_slot(node.conn, "slot_x")
    replication.drop_slot(node.conn, "slot_x")
    replication.set_synchronous_standby(node.conn, "node_zz")
    assert replication.replication_status(node.conn).synchronous_standby_names == '"node_zz"'
    replication.promote(node.conn)  # a primary: nothing to do, and its setting is untouched
    assert replication.replication_status(node.conn).synchronous_standby_names == '"node_zz"'
    replication.set_synchronous_standby(node.conn, None)
    status = replication.replication_status(node.conn)
    assert not status.in_recovery and status.standbys == () and status.lsn > 0


def test_extensions_never_run_with_a_tenant_schema_on_their_path(node: Node) -> None:
    # cube is trusted, so an app may create it in a schema of its own; earthdistance's
    # script (run as superuser) would then have that schema on its search_path.
    with node.appdb.cursor() as cur:
        cur.execute("SET ROLE app_owner")
        cur.execute("CREATE SCHEMA tenant_ext")
        cur.execute("CREATE EXTENSION cube SCHEMA tenant_ext")
        cur.execute("RESET ROLE")
    with pytest.raises(ValueError, match="requires cube"):
        tenants.ensure_extensions(node.appdb, ["earthdistance"])
    assert scalar(node.appdb, "SELECT count(*) FROM pg_extension "
                  "WHERE extname = 'earthdistance'") == 0
    with node.appdb.cursor() as cur:
        cur.execute("DROP SCHEMA tenant_ext CASCADE")
    tenants.ensure_extensions(node.appdb, ["earthdistance"])  # cube comes along, safely
    assert scalar(node.appdb, "SELECT string_agg(n.nspname, ',') FROM pg_extension e "
                  "JOIN pg_namespace n ON n.oid = e.extnamespace "
                  "WHERE extname IN ('cube', 'earthdistance')") == "extensions,extensions"
