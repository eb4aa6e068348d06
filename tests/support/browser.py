"""A real headless Chromium (Debian's `chromium`, installed by `make setup`): the DOM a
page renders to after its scripts ran, and a screenshot to look at."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-breakpad", "--window-size=1280,1000"]
TIMEOUT = 90.0


def _run(url: str, action: list[str]) -> str:
    binary = shutil.which("chromium")
    assert binary, "chromium is missing: `make setup` installs it (apt package chromium)"
    profile = tempfile.mkdtemp(prefix="pgha-chromium-")
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", *action, url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        # Its helpers (zygote, crashpad) are in the same session: none outlives the test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode in (0, -signal.SIGKILL), f"chromium exited {proc.returncode}"
    return out.decode("utf-8", "replace")


def dump_dom(url: str) -> str:
    """The document as Chromium serialises it once loaded (scripts, had any run)."""
    return _run(url, ["--dump-dom"])


def screenshot(url: str, path: Path) -> None:
    _run(url, [f"--screenshot={path}"])
    assert path.exists() and path.stat().st_size > 0, "chromium wrote no screenshot"
