"""Every environment variable the processes read goes through the validated settings:
a bad value stops `web`, `worker` or `serve` at once with exit status 2 and a message
that names the variable, never a traceback (and before anything is built: no cloud
resource, no listening socket)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import load_settings

ROOT = Path(__file__).resolve().parent.parent

# (process, variable, bad value): what an operator could put in a manifest by mistake.
BAD = [
    ("web", "BROKER_LISTEN", "localhost:8080"),
    ("web", "BROKER_LISTEN", "0.0.0.0; rm"),
    ("serve", "BROKER_LISTEN", "256.1.1.1"),
    ("web", "WEB_CONCURRENCY", "two"),
    ("web", "WEB_CONCURRENCY", "0"),
    ("web", "BROKER_WEB_THREADS", "4.5"),
    ("web", "BROKER_WEB_THREADS", "-1"),
    ("web", "PORT", "http"),
    ("web", "PORT", "70000"),
    ("serve", "BROKER_SERVE_THREADS", "many"),
    ("serve", "BROKER_SERVE_TIMEOUT", "-1"),
    ("worker", "BROKER_LOG_LEVEL", "LOUD"),
    ("web", "BROKER_LOG_LEVEL", "10"),
    ("worker", "BROKER_HOST_IDENTITY", "host:1"),
    ("worker", "BROKER_HOST_IDENTITY", "two words"),
    ("worker", "BROKER_MONITOR_INTERVAL", "soon"),
    ("worker", "VCAP_SERVICES", "{not json"),
]


@pytest.mark.parametrize(("command", "name", "value"), BAD)
def test_a_bad_value_stops_the_process_naming_the_variable(tmp_path: Path, command: str,
                                                           name: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p",
           "BROKER_STATE_DIR": str(tmp_path),
           # Should a process get past its settings, it builds nothing on this machine.
           "BROKER_CLOUD": "openstack", name: value}
    out = subprocess.run([sys.executable, "-m", "broker", command], capture_output=True,
                         text=True, cwd=ROOT, check=False, timeout=60, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert name in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_good_values_reach_the_settings() -> None:
    settings = load_settings({
        "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p", "BROKER_STATE_DIR": "/tmp/x",
        "PORT": "8081", "BROKER_LISTEN": "::", "WEB_CONCURRENCY": "3",
        "BROKER_WEB_THREADS": "6", "BROKER_SERVE_THREADS": "5", "BROKER_SERVE_TIMEOUT": "2.5",
        "BROKER_LOG_LEVEL": "debug", "BROKER_HOST_IDENTITY": "az1-host-7"})
    server = settings.server
    assert (settings.port, settings.log_level) == (8081, "DEBUG")
    assert (server.listen, server.web_workers, server.web_threads) == ("::", 3, 6)
    assert (server.serve_threads, server.serve_timeout) == (5, 2.5)
    defaults = load_settings({"BROKER_USERNAME": "u", "BROKER_PASSWORD": "p"}).server
    assert (defaults.listen, defaults.web_workers, defaults.web_threads) == (None, 2, 4)


def test_gunicorn_app_factory_stops_on_a_bad_value(tmp_path: Path) -> None:
    """`gunicorn 'broker.api.app:make_wsgi_app()'` reads the same settings: gunicorn
    stops ("App failed to load") with the variable named, no traceback, no worker
    booted again and again."""
    env = {"PATH": "/usr/bin:/bin", "BROKER_USERNAME": "u", "BROKER_PASSWORD": "p",
           "BROKER_STATE_DIR": str(tmp_path), "HOME": str(tmp_path),
           "BROKER_LOG_LEVEL": "LOUD"}
    out = subprocess.run([sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:0",
                          "broker.api.app:make_wsgi_app()"], capture_output=True, text=True,
                         cwd=ROOT, check=False, timeout=60, env=env)
    assert out.returncode != 0
    assert "broker: BROKER_LOG_LEVEL must be one of" in out.stderr, out.stderr
    assert "App failed to load" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr
