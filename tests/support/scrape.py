"""Reading a Prometheus endpoint as Prometheus would: samples by name and labels."""

from __future__ import annotations

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import PASSWORD, USERNAME

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, auth: tuple[str, str] | None = (USERNAME, PASSWORD)) -> Samples:
    response = requests.get(url, auth=auth, timeout=10)
    assert response.status_code == 200, (response.status_code, response.text[:200])
    assert response.headers["Content-Type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample `name` whose labels include `labels` (None: no such sample)."""
    wanted = set(labels.items())
    found = [v for (n, have), v in samples.items() if n == name and wanted <= have]
    assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
    return found[0] if found else None
