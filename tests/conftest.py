"""Shared fixtures live in tests/fixtures/*, one module per real part."""

pytest_plugins = [
    "tests.fixtures.pg",
    "tests.fixtures.local",
    "tests.fixtures.openstack",
]
