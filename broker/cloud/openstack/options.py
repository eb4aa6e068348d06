"""The OpenStack driver's own settings (`BROKER_OPENSTACK_*`), with documented defaults.

Credentials are NOT here: openstacksdk reads them itself (`OS_CLOUD` + clouds.yaml,
or the `OS_*` variables). See docs/openstack.md for every variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from broker.config import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class OpenStackOptions:
    # A second clouds.yaml entry with admin rights, used ONLY for reading servers'
    # host status and compute services, forcing a service down after the fencing hook
    # confirmed its host off, and Cinder force-detach. None: member-only.
    admin_cloud: str | None = None
    api_timeout: float = 30.0          # one HTTP request
    boot_timeout: float = 600.0        # server BUILD -> ACTIVE
    volume_timeout: float = 300.0      # volume creating -> available, deleting -> gone
    delete_timeout: float = 180.0      # server delete -> gone
    stop_timeout: float = 30.0         # os-stop -> SHUTOFF before the delete escalation
    detach_timeout: float = 60.0       # interface/volume detach -> unbound
    # attach_port -> PostgreSQL answers on the service address (the guest's NIC agent
    # configures it when the NIC appears). Only code can set 0, which skips the check:
    # the API-level tests, whose fake servers have no guest to answer.
    reach_timeout: float = 60.0
    host_down_timeout: float = 240.0   # dead host: wait for Nova to release the server
    # An operator's command that powers a compute host off (IPMI, Masakari, ...), run
    # as `<hook> <host>`; exit 0 means the host is off. Only then is its compute
    # service forced down. Needs admin_cloud (host names and services are admin-only).
    fence_hook: str | None = None
    fence_hook_after: float = 30.0     # heartbeat frozen this long before the hook runs
    fence_hook_timeout: float = 120.0  # the hook's own run time
    volume_device: str | None = None   # None: /dev/disk/by-id/virtio-<volume id[:20]>
    config_drive: bool = False
    retry_budget: float = 60.0         # total time spent retrying one call
    retry_base_delay: float = 0.5
    retry_max_delay: float = 8.0
    poll_interval: float = 0.5         # first poll of a wait; doubles up to the max
    poll_max_interval: float = 5.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OpenStackOptions:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"BROKER_OPENSTACK_{f.name.upper()}"
            raw = env.get(name)
            if raw is None:
                continue
            raw = raw.strip()
            if f.type in ("bool",):
                if raw.lower() not in _TRUE | _FALSE:
                    raise ConfigError(f"{name} must be true or false, got {raw!r}")
                values[f.name] = raw.lower() in _TRUE
            elif f.type in ("float",):
                try:
                    number = float(raw)
                except ValueError:
                    raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") \
                        from None
                if number <= 0:
                    raise ConfigError(f"{name} must be positive, got {raw!r}")
                values[f.name] = number
            else:
                values[f.name] = raw or None
        if env.get("BROKER_OPENSTACK_FORCE_DOWN") is not None:
            raise ConfigError("BROKER_OPENSTACK_FORCE_DOWN is gone: forcing a compute service "
                              "down on a frozen heartbeat alone can corrupt the VMs of every "
                              "tenant on that host. Set BROKER_OPENSTACK_FENCE_HOOK to a "
                              "command that powers the host off (the broker then forces the "
                              "service down only after the command confirmed it)")
        options = cls(**values)  # type: ignore[arg-type]
        if options.fence_hook and not options.admin_cloud:
            raise ConfigError("BROKER_OPENSTACK_FENCE_HOOK needs BROKER_OPENSTACK_ADMIN_CLOUD: "
                              "a server's compute host and its service are visible to admins "
                              "only")
        if options.fence_hook and options.fence_hook_after < 20:
            raise ConfigError("BROKER_OPENSTACK_FENCE_HOOK_AFTER must be at least 20 s "
                              "(more than twice Nova's report_interval), or a live host "
                              "between two heartbeats could be powered off")
        return options
