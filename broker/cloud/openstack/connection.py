"""Connecting the way openstacksdk users expect: `OS_CLOUD` + clouds.yaml, or `OS_*`.

A broker that cannot reach or authenticate to its cloud stops at start with one
plain sentence (never a password: keystoneauth's messages carry none, and the
SDK's debug logging, which prints request bodies, is held at INFO).
"""

from __future__ import annotations

import logging
from typing import Any

import openstack
from keystoneauth1 import exceptions as ks_exc
from openstack import exceptions as os_exc

from broker.cloud.openstack.calls import scrub
from broker.cloud.openstack.options import OpenStackOptions
from broker.config import ConfigError

_CHATTY = ("keystoneauth", "openstack", "urllib3", "stevedore")


def quiet_sdk_logs() -> None:
    """Request bodies (user-data holds passwords) are logged at DEBUG: never show them."""
    for name in _CHATTY:
        logger = logging.getLogger(name)
        # Pinned on the logger itself: a root logger set to DEBUG later cannot undo it.
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)


def _auth_url(conn: Any) -> str:
    try:
        return str(conn.config.config.get("auth", {}).get("auth_url") or "(no auth_url)")
    except Exception:
        return "(unknown auth_url)"


def connect(cloud: str | None, options: OpenStackOptions, *, role: str = "broker") -> Any:
    """An authenticated openstacksdk Connection, or ConfigError in words."""
    quiet_sdk_logs()
    label = f"cloud {cloud!r}" if cloud else "the OS_CLOUD / OS_* settings"
    try:
        conn = openstack.connect(cloud=cloud, api_timeout=options.api_timeout)
    except os_exc.ConfigException as exc:
        raise ConfigError(f"OpenStack ({role}): {label} cannot be loaded: "
                          f"{scrub(str(exc))}. Set OS_CLOUD and a clouds.yaml, or the OS_* "
                          "variables (OS_AUTH_URL, OS_USERNAME, ...)") from None
    where = _auth_url(conn)
    try:
        # The session, not conn.authorize(): that one flattens keystoneauth's errors.
        conn.session.get_token()
    except ks_exc.Unauthorized:
        raise ConfigError(f"OpenStack ({role}) refused the credentials of {label} "
                          f"at {where}") from None
    except (ks_exc.ConnectFailure, ks_exc.ConnectTimeout, ks_exc.DiscoveryFailure,
            ks_exc.UnknownConnectionError) as exc:
        raise ConfigError(f"cannot reach OpenStack identity at {where} ({role}): "
                          f"{scrub(str(exc))}") from None
    except (ks_exc.MissingRequiredOptions, ks_exc.MissingAuthPlugin,
            ks_exc.AuthPluginException) as exc:
        raise ConfigError(f"OpenStack credentials ({role}) are incomplete in {label}: "
                          f"{scrub(str(exc))}. Set OS_CLOUD and a clouds.yaml, or "
                          "OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME, "
                          "OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME") from None
    except (ks_exc.ClientException, os_exc.SDKException) as exc:
        raise ConfigError(f"OpenStack ({role}) at {where}: {scrub(str(exc))}") from None
    return conn


def connect_from_env(options: OpenStackOptions) -> tuple[Any, Any]:
    """The broker's connection, and the admin one if BROKER_OPENSTACK_ADMIN_CLOUD is set."""
    conn = connect(None, options)
    admin = connect(options.admin_cloud, options, role="admin") if options.admin_cloud else None
    return conn, admin
