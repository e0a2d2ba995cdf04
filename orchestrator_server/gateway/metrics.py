"""Prometheus metrics of the gateway, in the process's default registry (served by /metrics).

The route label is the path template (`/agents/{agent_id}`), never the concrete path, so the number
of series stays bounded whatever callers send; requests that match no route share `unmatched`.
"""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "orchestrator_gateway_requests_total",
    "HTTP requests answered by the REST gateway, by method, route template and status code.",
    ["method", "route", "code"],
)
LATENCY = Histogram(
    "orchestrator_gateway_request_duration_seconds",
    "Time to answer an HTTP request (for streamed responses: until the first message is sent).",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
OPEN_STREAMS = Gauge(
    "orchestrator_gateway_open_streams",
    "Streamed (watch) responses currently open.",
)


# Any token is a valid HTTP method, so others are folded into one label value.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _method_label(method: str) -> str:
    return method if method in _KNOWN_METHODS else "OTHER"


# `labels()` costs several microseconds a call; the label sets are few (routes x methods x codes;
# anything else is `unmatched` / `OTHER`), so their children are kept.
@functools.lru_cache(maxsize=4096)
def _request_counter(method: str, route: str, status: int) -> Any:
    return REQUESTS.labels(method=_method_label(method), route=route, code=str(status))


@functools.lru_cache(maxsize=4096)
def _latency_histogram(method: str, route: str) -> Any:
    return LATENCY.labels(method=_method_label(method), route=route)


def count_request(method: str, route: str, status: int) -> None:
    _request_counter(method, route, status).inc()


def observe_latency(method: str, route: str, seconds: float) -> None:
    _latency_histogram(method, route).observe(seconds)
