"""Bindings: one PostgreSQL role per binding, made synchronously (it takes milliseconds).

Called by the API layer. The Binding row (state `creating`, password encrypted) is
written BEFORE the role exists, so a crash in between leaves a row that a repeated
PUT finishes and a DELETE (orphan mitigation) cleans up. The role is created on
the primary over its management address as the instance's superuser, from the
`postgres` database (no binding can reach it); apps reach it through the service
address, which never changes for the instance's lifetime.

Before each binding the tenant model is checked (one query) and put in place if an
earlier version made the instance: an existing instance is upgraded on its next bind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import psycopg2
from psycopg2.extensions import connection as Connection
from sqlalchemy.exc import IntegrityError

from broker.crypto import new_password
from broker.operations import queue
from broker.operations.refusals import Busy, Conflict, UnknownInstance
from broker.pg import connection, roles, tenants
from broker.pg.names import APP_DATABASE
from broker.runtime import Runtime
from broker.store.models import (
    BINDING_CREATED,
    BINDING_CREATING,
    BINDING_DELETED,
    DEGRADED,
    DEPROVISIONED,
    READY,
    Binding,
    Instance,
    Node,
    utcnow,
)

log = logging.getLogger(__name__)

PORT = 5432
# Operations during which the primary stays where it is: binding is safe meanwhile (a
# backup only reads the primary, for hours on a large database).
_BIND_SAFE_KINDS = ("rebuild", *queue.BACKGROUND_KINDS)


class BindingConflict(Conflict):
    """The binding id exists with other attributes."""


class InstanceNotReady(Busy):
    """The instance has an operation in progress, or no primary that answers."""


class InstanceUnknown(UnknownInstance):
    """No such (live) instance."""


@dataclass(frozen=True)
class BindResult:
    credentials: dict[str, Any]
    created: bool           # False: identical binding already existed (→ 200 instead of 201)


def credentials(host: str, username: str, password: str,
                database: str = APP_DATABASE, port: int = PORT, *,
                ca_pem: str | None = None) -> dict[str, Any]:
    """What apps parse (java-cfenv, Spring, cfenv): uri, jdbcUrl, host(name), port, ...

    With the instance's CA, both URLs ask for TLS with the host verified
    (`verify-full`: the service address is in every node's certificate), and the CA
    comes as PEM in `ca_certificate`. libpq and pgjdbc read the CA from a FILE: an app
    writes it to `~/.postgresql/root.crt` (both drivers' default) or names its file
    with `sslrootcert` (PGSSLROOTCERT for libpq)."""
    user_q, pw_q = quote(username, safe=""), quote(password, safe="")
    uri_tls = jdbc_tls = ""
    if ca_pem is not None:
        uri_tls, jdbc_tls = "?sslmode=verify-full", "&ssl=true&sslmode=verify-full"
    out: dict[str, Any] = {
        "uri": f"postgresql://{user_q}:{pw_q}@{host}:{port}/{database}{uri_tls}",
        "jdbcUrl": f"jdbc:postgresql://{host}:{port}/{database}?user={user_q}&password={pw_q}"
                   f"{jdbc_tls}",
        "hostname": host,
        "host": host,
        "port": port,
        "name": database,
        "database": database,
        "username": username,
        "password": password,
    }
    if ca_pem is not None:
        out.update(sslmode="verify-full", ca_certificate=ca_pem)
    return out


def _live_instance(runtime: Runtime, instance_id: str) -> Instance:
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        if inst is None or inst.deleted_at is not None or inst.state == DEPROVISIONED:
            raise InstanceUnknown(f"instance {instance_id} does not exist")
        _ = list(inst.nodes)
        return inst


def _check_ready(runtime: Runtime, inst: Instance) -> None:
    if inst.state not in (READY, DEGRADED):
        raise InstanceNotReady(f"the instance is {inst.state}; bind again once it is ready")
    busy = queue.busy_kind(runtime.store, inst.id, except_kinds=_BIND_SAFE_KINDS)
    if busy is not None:
        raise InstanceNotReady(f"an operation ({busy}) is in progress on the instance; "
                               "bind again once it has finished")


def _primary(inst: Instance) -> Node:
    primary = inst.primary()
    if primary is None or not primary.management_address:
        raise InstanceNotReady("the instance has no primary right now; bind again shortly")
    return primary


def _same(binding: Binding, app_guid: str | None, bind_resource: dict[str, Any],
          parameters: dict[str, Any]) -> bool:
    return (binding.app_guid == app_guid and (binding.bind_resource or {}) == bind_resource
            and (binding.parameters or {}) == parameters)


def _credentials_of(runtime: Runtime, inst: Instance, binding: Binding) -> dict[str, Any]:
    if not inst.service_address:
        raise InstanceNotReady("the instance has no service address yet")
    primary = inst.primary()
    return credentials(inst.service_address, binding.role_name,
                       runtime.vault.decrypt(binding.password_enc),
                       ca_pem=inst.ca_for(primary) if primary is not None else None)


def create_binding(runtime: Runtime, instance_id: str, binding_id: str, *,
                   app_guid: str | None, bind_resource: dict[str, Any],
                   parameters: dict[str, Any]) -> BindResult:
    bind_resource, parameters = dict(bind_resource or {}), dict(parameters or {})
    inst = _live_instance(runtime, instance_id)
    with runtime.store.session() as s:
        existing = s.get(Binding, binding_id)
        if existing is not None and existing.state != BINDING_DELETED:
            if existing.instance_id != instance_id or not _same(
                    existing, app_guid, bind_resource, parameters):
                raise BindingConflict(f"binding {binding_id} already exists with other "
                                      "attributes")
            if existing.state == BINDING_CREATED:
                return BindResult(_credentials_of(runtime, inst, existing), created=False)
    _check_ready(runtime, inst)
    primary = _primary(inst)
    read_only = bool(parameters.get("read_only", False))

    # The row first: a crash after the role exists but before the row would leak a role.
    try:
        with runtime.store.session() as s:
            row = s.get(Binding, binding_id)
            if row is None:
                row = Binding(id=binding_id, instance_id=instance_id,
                              role_name=roles.binding_role_name(binding_id),
                              password_enc=runtime.vault.encrypt(new_password()))
                s.add(row)
            elif row.state == BINDING_DELETED:
                # A reused id after unbind: a fresh role with a fresh password.
                row.instance_id = instance_id
                row.password_enc = runtime.vault.encrypt(new_password())
                row.deleted_at = None
            row.app_guid = app_guid
            row.bind_resource = bind_resource
            row.parameters = parameters
            row.state = BINDING_CREATING
            role, password_enc = row.role_name, row.password_enc
    except IntegrityError:
        # An identical PUT raced us and inserted first: answer as for a repeat.
        return create_binding(runtime, instance_id, binding_id, app_guid=app_guid,
                              bind_resource=bind_resource, parameters=parameters)

    password = runtime.vault.decrypt(password_enc)
    try:
        conn = connection.connect(primary.management_address or "", runtime.vault.decrypt(
            inst.admin_password_enc), ca_pem=inst.ca_for(primary))
    except psycopg2.OperationalError:
        # The row stays `creating`: a repeated PUT finishes it, a DELETE removes it.
        raise InstanceNotReady("the instance's primary does not answer right now; "
                               "bind again shortly") from None
    try:
        if not tenants.tenant_model_in_place(conn):
            _upgrade_tenant_model(runtime, inst, primary, conn)
        roles.create_binding_role(conn, role, password, read_only=read_only)
    finally:
        conn.close()
    with runtime.store.session() as s:
        row = s.get(Binding, binding_id)
        assert row is not None
        row.state = BINDING_CREATED
    log.info("binding %s created on instance %s (role %s)", binding_id, instance_id, role)
    return BindResult(credentials(inst.service_address or "", role, password,
                                  ca_pem=inst.ca_for(primary)), created=True)


def _upgrade_tenant_model(runtime: Runtime, inst: Instance, primary: Node,
                          conn: Connection) -> None:
    """The tenant model on an instance an earlier version made. The standbys' pg_hba
    first (read-only roles are admitted as members of the new group once promoted);
    one that does not answer now gets it when it is rebuilt or resurrected."""
    password = runtime.vault.decrypt(inst.admin_password_enc)
    for node in inst.live_nodes():
        if node.id == primary.id or not node.management_address:
            continue
        try:
            standby = connection.connect(node.management_address, password, timeout=3,
                                         ca_pem=inst.ca_for(node))
        except psycopg2.OperationalError:
            log.warning("instance %s: node %s unreachable; its pg_hba keeps the old "
                        "read-only group", inst.id, node.id)
            continue
        try:
            tenants.use_read_only_group_in_hba(standby)
        finally:
            standby.close()
    tenants.ensure_tenant_model(conn)
    log.info("instance %s: tenant model put in place", inst.id)


def get_credentials(runtime: Runtime, instance_id: str, binding_id: str) -> dict[str, Any] | None:
    """Credentials of an existing binding, None if unknown (→ 404)."""
    with runtime.store.session() as s:
        binding = s.get(Binding, binding_id)
        if binding is None or binding.instance_id != instance_id \
                or binding.state != BINDING_CREATED:
            return None
        inst = s.get(Instance, instance_id)
        if inst is None or not inst.service_address:
            return None
        return _credentials_of(runtime, inst, binding)


def delete_binding(runtime: Runtime, instance_id: str, binding_id: str) -> bool:
    """Drop the role (terminating its sessions); False if the binding was never known or
    is deleted already (→ 410). Cleans up a half-made binding (orphan mitigation)."""
    with runtime.store.session() as s:
        binding = s.get(Binding, binding_id)
        if binding is None or binding.instance_id != instance_id \
                or binding.state == BINDING_DELETED:
            return False
        role = binding.role_name
        inst = s.get(Instance, instance_id)
        primary = inst.primary() if inst is not None else None
        admin_password_enc = inst.admin_password_enc if inst is not None else None
        ca_pem = inst.ca_for(primary) if inst is not None and primary is not None else None
        gone = inst is None or inst.deleted_at is not None or inst.state == DEPROVISIONED
    if not gone and primary is not None and primary.management_address and admin_password_enc:
        # The primary unreachable → 422 ConcurrencyError: the platform retries the
        # DELETE, and the role must not outlive its binding.
        try:
            conn = connection.connect(primary.management_address, runtime.vault.decrypt(
                admin_password_enc), ca_pem=ca_pem)
        except psycopg2.OperationalError:
            raise InstanceNotReady("the instance's primary does not answer right now; "
                                   "unbind again shortly") from None
        try:
            roles.drop_binding_role(conn, role)
        finally:
            conn.close()
    with runtime.store.session() as s:
        row = s.get(Binding, binding_id)
        if row is not None and row.state != BINDING_DELETED:
            row.state = BINDING_DELETED
            row.deleted_at = utcnow()
    log.info("binding %s deleted from instance %s", binding_id, instance_id)
    return True
