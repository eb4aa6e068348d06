"""A real `python -m broker web` (gunicorn) for one test: started with the given
environment, ready once GET /health answers, stopped (and checked stopped) at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from harness.machine import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


@contextlib.contextmanager
def run_web(env: dict[str, str], log_path: Path, *, workers: int = 2) -> Iterator[str]:
    """Yields the base URL (`http://127.0.0.1:<port>`); the log (stdout and stderr,
    access log included) goes to `log_path`."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "web"], cwd=ROOT,
            env={**env, "PORT": str(port), "BROKER_LISTEN": "127.0.0.1",
                 "WEB_CONCURRENCY": str(workers), "BROKER_WEB_THREADS": "2",
                 "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("broker web did not start: "
                                   + log_path.read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
