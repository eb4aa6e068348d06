"""Each instance's status page (the OSB dashboard_url) under gunicorn, seen in a real
headless Chromium: it shows the nodes and the failover history, renders tenant text as
text (no script runs, no element is injected), answers one identical 404 for a wrong
token and an unknown or deleted instance, and no log line holds its token."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.runtime import Runtime
from broker.store.models import READY, Failover, Instance, utcnow
from tests.support.api import (
    API_VERSION,
    add_nodes,
    broker_env,
    make_runtime,
    operations,
    osb_headers,
    set_instance,
    set_operation,
)
from tests.support.browser import dump_dom, screenshot
from tests.support.web import run_web

SERVICE_ID = "1cca2857-72b8-400e-be1b-41e15a71eb63"
HA_SYNC = "0b9c3229-0c1c-42a0-af83-020c16ec0142"
# Would change the title, or leave an element in the DOM, if rendered as markup.
XSS = ("<img src=x onerror=\"document.title='pwned'\">"
       "<script>document.title='pwned'</script></td><b id=injected>")


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Runtime, Path]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(broker_env(f"sqlite:///{tmp_path / 'state.sqlite3'}", tmp_path / "state"))
    runtime = make_runtime(env)
    log = tmp_path / "web.log"
    try:
        with run_web(env, log) as base:
            yield base, runtime, log
    finally:
        runtime.store.dispose()


class _Elements(HTMLParser):
    """The tags of a document and the text of its title and h1."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.text_of: dict[str, str] = {"title": "", "h1": ""}
        self._open: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            del self._open[len(self._open) - 1 - self._open[::-1].index(tag):]

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1] in self.text_of:
            self.text_of[self._open[-1]] += data


def _provision(base: str, instance_id: str, name: str) -> dict[str, Any]:
    response = requests.put(
        f"{base}/v2/service_instances/{instance_id}?accepts_incomplete=true",
        headers=osb_headers(), timeout=30,
        json={"service_id": SERVICE_ID, "plan_id": HA_SYNC, "organization_guid": "org",
              "space_guid": "space",
              "context": {"platform": "cloudfoundry", "instance_name": name}})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def _as_provisioned(runtime: Runtime, instance_id: str) -> None:
    """The rows a finished provision and one failover leave (no servers behind them)."""
    for op in operations(runtime, instance_id):
        set_operation(runtime, op.id, "succeeded")
    set_instance(runtime, instance_id, READY, last_lag_bytes=4096, last_checked_at=utcnow())
    add_nodes(runtime, instance_id, standby=True)
    detected = utcnow() - timedelta(minutes=5)
    with runtime.store.session() as s:
        inst = s.get(Instance, instance_id)
        assert inst is not None
        primary, standby = inst.primary(), inst.standby()
        assert primary is not None and standby is not None
        inst.sync_standby_node_id = standby.id
        primary.tls_expires_at = utcnow() + timedelta(days=364)
        s.add(Failover(id=uuid.uuid4().hex, instance_id=instance_id, kind="failover",
                       cause=XSS, old_primary_node_id="0ld0ld00",
                       new_primary_node_id=primary.id, detected_at=detected,
                       fenced_at=detected + timedelta(seconds=0.12),
                       port_attached_at=detected + timedelta(seconds=0.16),
                       promoted_at=detected + timedelta(seconds=0.31),
                       standby_streaming_at=detected + timedelta(seconds=3.5),
                       outcome="succeeded"))


def test_status_page_shows_nodes_and_failovers_as_text(web: tuple[str, Runtime, Path],
                                                       tmp_path: Path) -> None:
    base, runtime, log = web
    instance_id = f"db-{uuid.uuid4().hex[:8]}"
    url = _provision(base, instance_id, XSS)["dashboard_url"]
    assert url.startswith(f"{base}/dashboard/{instance_id}/")
    _as_provisioned(runtime, instance_id)

    # GET instance hands out the same URL; either gunicorn process serves it.
    got = requests.get(f"{base}/v2/service_instances/{instance_id}", headers=osb_headers(),
                       timeout=10)
    assert got.status_code == 200 and got.json()["dashboard_url"] == url
    for _ in range(4):
        page = requests.get(url, timeout=10)
        assert page.status_code == 200
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"

    dom = dump_dom(url)
    seen = _Elements()
    seen.feed(dom)
    # No element came from the tenant's text, no script ran, and the text is shown as is.
    assert not {"img", "script", "b"} & seen.tags, seen.tags
    assert seen.text_of["title"].startswith(XSS)
    assert seen.text_of["h1"] == XSS
    assert dom.count('class="node"') == 2
    assert 'data-role="primary"' in dom and 'data-role="standby"' in dom
    assert "4096 bytes, synchronous" in dom
    assert dom.count('class="failover"') == 1
    for phase, took in (("fence", "0.120 s"), ("port", "0.040 s"), ("promote", "0.150 s"),
                        ("standby", "3.190 s"), ("total", "0.310 s")):
        assert f'data-phase="{phase}">{phase}\n{took}' in dom
    screenshot(url, tmp_path / "status-page.png")

    token = url.rsplit("/", 1)[1]
    assert token not in log.read_text(errors="replace")
    assert f"/dashboard/{instance_id}/***" in log.read_text(errors="replace")


def test_wrong_token_unknown_and_deleted_instances_look_the_same(
        web: tuple[str, Runtime, Path]) -> None:
    base, runtime, _ = web
    first, second = f"db-{uuid.uuid4().hex[:8]}", f"db-{uuid.uuid4().hex[:8]}"
    url = _provision(base, first, "orders")["dashboard_url"]
    other = _provision(base, second, "billing")["dashboard_url"]
    token = url.rsplit("/", 1)[1]
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    answers = [
        requests.get(f"{base}/dashboard/{first}/{wrong}", timeout=10),
        requests.get(f"{base}/dashboard/{first}/{other.rsplit('/', 1)[1]}", timeout=10),
        requests.get(f"{base}/dashboard/no-such-instance/{token}", timeout=10),
    ]
    assert requests.get(url, timeout=10).status_code == 200
    set_instance(runtime, first, "deprovisioned", deleted_at=utcnow())
    answers.append(requests.get(url, timeout=10))
    assert {a.status_code for a in answers} == {404}
    assert len({a.content for a in answers}) == 1
    assert first not in answers[0].text
    # The page needs no broker credentials; the OSB API and metrics still do.
    assert requests.get(f"{base}/v2/catalog", headers={"X-Broker-API-Version": API_VERSION},
                        timeout=10).status_code == 401
    assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
