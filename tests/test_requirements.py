"""requirements.txt is what Cloud Foundry's buildpack installs: it pins every runtime
dependency within what pyproject.toml allows, and the tests run on those very versions
(CI installs with it as constraints)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.txt: {line!r} is not pinned with =="
        assert _key(name) not in pins, f"requirements.txt: {name} twice"
        pins[_key(name)] = version.strip()
    return pins


def test_every_dependency_is_pinned_within_pyproject() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        requirement = Requirement(raw)
        version = pins.get(_key(requirement.name))
        assert version is not None, f"{requirement.name} is not in requirements.txt"
        assert requirement.specifier.contains(version, prereleases=True), \
            f"requirements.txt pins {requirement.name}=={version}, pyproject says {raw}"


def test_pins_are_closed_under_their_own_requirements() -> None:
    """What a pinned package needs is pinned too (else the buildpack picks a version)."""
    pins = _pins()
    for key in pins:
        for raw in metadata.distribution(key).requires or []:
            requirement = Requirement(raw)
            if requirement.marker is not None and not requirement.marker.evaluate(
                    {"extra": ""}):
                continue
            if _key(requirement.name) == "setuptools":  # the installer's own, never pinned
                continue
            assert _key(requirement.name) in pins, f"{key} needs {raw}: not pinned"


def test_the_tests_run_on_the_pinned_versions() -> None:
    for key, version in _pins().items():
        assert metadata.version(key) == version, \
            f"{key} {metadata.version(key)} is installed, requirements.txt pins {version}: " \
            "install with `pip install -c requirements.txt -e '.[test]'` (make setup)"
