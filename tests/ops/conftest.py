"""A real server's /metrics, scraped once for the alert and dashboard tests."""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ServerProcess


@dataclass
class Scrape:
    text: str
    # sample name -> label name -> values seen
    labels: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )


def _get(url: str, body: dict[str, str] | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as response:
        return bytes(response.read())


@pytest.fixture(scope="session")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scrape]:
    """`orchestrator serve` as a process with the gateway; one registration and one REST call so
    the labelled series (RPC latency by method, REST requests by route) exist, then /metrics."""
    server = ServerProcess(
        tmp_path_factory.mktemp("metrics-server"), GATEWAY_ENABLED="true", SHUTDOWN_DELAY="0"
    ).start()
    try:
        base = f"http://127.0.0.1:{server.http_port}"
        _get(f"{base}/agents/register", {"name": "scraped", "instance_id": "1", "type": "cost"})
        _get(f"{base}/health/system")
        result = Scrape(_get(f"{base}/metrics").decode())
    finally:
        server.stop()
    for family in text_string_to_metric_families(result.text):
        for sample in family.samples:
            labels = result.labels[sample.name]
            for label, value in sample.labels.items():
                labels[label].add(value)
    yield result
