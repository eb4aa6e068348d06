"""The default catalog with changes to one plan's `cloud` settings, written for a test."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from broker.catalog import Catalog, load_catalog
from broker.config import DEFAULT_CATALOG


def catalog_with(path: Path, plan_name: str = "ha-sync", **cloud: Any) -> Catalog:
    """Write the default catalog with `cloud` merged into `plan_name`'s settings to
    `path`, and load it."""
    doc = copy.deepcopy(yaml.safe_load(DEFAULT_CATALOG.read_text()))
    for plan in doc["services"][0]["plans"]:
        if plan["name"] == plan_name:
            plan["cloud"].update(cloud)
    path.write_text(yaml.safe_dump(doc))
    return load_catalog(path)
