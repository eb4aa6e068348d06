"""Shared fixtures live in tests/support/*, one module per real part; the helpers they
share with the benchmarks in the top-level `harness` package.

A skipped test is a test that does not exist: with `CI` set (CI runs as root with
PostgreSQL and network namespaces available) every skip is turned into a failure, and
a run as non-root ends with a loud line saying how much of the suite it left out.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

pytest_plugins = [
    "tests.support.pg",
    "tests.support.local",
    "tests.support.openstack",
    "tests.support.load",
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped with CI set, which counts as a missing test: {reason}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = len(terminalreporter.stats.get("skipped", []))
    if skipped and os.geteuid() != 0:
        terminalreporter.write_line(
            f"{skipped} tests were SKIPPED because they need root (network namespaces, "
            "PostgreSQL as another user): run `make test` as root to run the whole suite.",
            red=True, bold=True)
