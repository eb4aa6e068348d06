"""An HTTP-level OpenStack fake (Keystone, Nova, Neutron, Cinder, Glance, Nova's
metadata service) on loopback, one blueprint per service (app.py wires them).

It behaves like an upstream deployment with default policies and configuration;
CloudState's switches model a cloud that changed them: `host_status_policy`
("admin", "unknown-only", "member"), `service_down_time`, `rpc_response_timeout`,
`reclaim_instance_interval`, `metadata_cache_expiration`, `quotas`.

    fake = FakeOpenStack().start()
    fake.write_clouds_yaml(tmp_dir)  # then OS_CLIENT_CONFIG_FILE / OS_CLOUD=fake
    fake.state.kill_host("cmp-az1-1")
    fake.fail("POST", r"/servers$", status=500, times=2)
    fake.fail("POST", r"/ports$", status=500, applied=True)  # made, then a 500
    fake.stop()
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import yaml
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from tests.fakes.openstack.app import USERS, make_app
from tests.fakes.openstack.state import CloudState, FaultRule, Recorded

__all__ = ["CloudState", "FakeOpenStack", "FaultRule", "Recorded"]


class _QuietHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real API endpoint

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # the fake's own `requests` list is the record


class FakeOpenStack:
    def __init__(self, state: CloudState | None = None) -> None:
        self.state = state or CloudState()
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> FakeOpenStack:
        self._server = make_server("127.0.0.1", 0, make_app(self.state), threaded=True,
                                   request_handler=_QuietHandler)
        server = self._server
        self._thread = threading.Thread(target=lambda: server.serve_forever(poll_interval=0.05),
                                        name="fake-openstack", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            assert not self._thread.is_alive(), "the fake OpenStack did not stop"
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def auth_url(self) -> str:
        return f"{self.url}/identity/v3"

    # --- client configuration -------------------------------------------------------
    def cloud_config(self, user: str = "broker") -> dict[str, Any]:
        return {
            "auth": {"auth_url": self.auth_url, "username": user,
                     "password": USERS[user][0], "project_name": "pgha",
                     "user_domain_name": "Default", "project_domain_name": "Default"},
            "region_name": "RegionOne", "interface": "public",
            "identity_api_version": 3,
        }

    def write_clouds_yaml(self, directory: Path) -> Path:
        """A clouds.yaml with `fake` (least privilege) and `fake-admin` entries."""
        path = directory / "clouds.yaml"
        doc = {"clouds": {"fake": self.cloud_config("broker"),
                          "fake-admin": self.cloud_config("admin")}}
        path.write_text(yaml.safe_dump(doc))
        return path

    # --- fault injection and inspection --------------------------------------------------
    def fail(self, method: str | None, path: str, *, status: int | None = 500,
             times: int | None = 1, delay: float = 0.0,
             body: dict[str, Any] | None = None, applied: bool = False) -> FaultRule:
        """Fail matching requests before they are applied, or (applied=True) after."""
        rule = FaultRule(path=path, method=method, status=status, times=times, delay=delay,
                         body=body, applied=applied)
        with self.state.lock:
            self.state.faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        import re

        with self.state.lock:
            return [r for r in self.state.requests
                    if (method is None or r.method == method)
                    and (path is None or re.search(path, r.path))]
