"""Prometheus metrics of the orchestrator.

Counters and histograms are module-level (one set per process, as Prometheus expects); gauges that
describe state (agents by status, open sessions, queue depth, failover pause) are computed at scrape
time from the live servers, so nothing on the hot path keeps them up to date.

Counters with a known, small set of label values are exported at 0 from the start: an alert on
`increase()` then sees the first event, and a dashboard shows 0 rather than "no data". The
`_created` series prometheus_client adds to every counter and histogram are turned off: nothing
here reads them, and they doubled the series count. deploy/prometheus/alerts.yml and
deploy/grafana/orchestrator.json use these names; tests/ops checks them against a real scrape.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.v1 import agent_pb2, task_pb2

if TYPE_CHECKING:  # health imports the registry, which the store's metrics must not pull in
    from orchestrator_server.health import WorkloadSummary

disable_created_metrics()  # type: ignore[no-untyped-call]

RPC_LATENCY = Histogram(
    "orchestrator_rpc_duration_seconds",
    "Time to answer an RPC (streams: their whole life), by method and status code.",
    ["method", "code"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600),
)
HEARTBEATS = Counter(
    "orchestrator_heartbeats_total", "Heartbeats received, by kind (stream or unary).", ["kind"]
)
TRANSITIONS = Counter(
    "orchestrator_agent_transitions_total", "Agent status transitions, by the status entered.", ["status"]
)
DISPATCH_LATENCY = Histogram(
    "orchestrator_dispatch_latency_seconds",
    "Time from a task becoming placeable to its assignment being pushed to an agent.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30),
)
FAILOVERS = Counter("orchestrator_failovers_total", "Tasks moved off an agent that went away.")
# The pause itself lasts MASS_FAILURE_WINDOW seconds after the last drop, often less than a scrape
# interval: the counter keeps it visible to alerts.
FAILOVER_PAUSES = Counter(
    "orchestrator_failover_pauses_total", "Times failover paused because a large share of agents dropped."
)
TASKS_FINISHED = Counter(
    "orchestrator_tasks_finished_total", "Tasks that reached a terminal state.", ["status"]
)
STORE_COMMIT_ERRORS = Counter(
    "orchestrator_store_commit_errors_total",
    "Writes the store failed to commit (each failed the operation that asked for it).",
)
RATE_LIMITED = Counter(
    "orchestrator_rate_limited_total",
    "Calls refused (api_calls, heartbeats) or session messages slowed (session_messages) by a "
    "per-principal rate limit.",
    ["budget"],
)


def count_rate_limited(what: str) -> None:
    """Counts one refusal or pacing; `what` is the budget as the limit's message names it."""
    RATE_LIMITED.labels(what.lower().replace(" ", "_")).inc()


class StateSource(Protocol):
    """What a running server exposes for the scrape-time gauges."""

    def agent_statuses(self) -> Iterable[int]: ...

    def workload(self) -> WorkloadSummary: ...

    def open_sessions(self) -> int: ...


_sources: weakref.WeakSet[StateSource] = weakref.WeakSet()


class _StateCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        agents = GaugeMetricFamily("orchestrator_agents", "Registered agents by status.", labels=["status"])
        pending = GaugeMetricFamily("orchestrator_tasks_pending", "Tasks waiting for placement.")
        running = GaugeMetricFamily("orchestrator_tasks_running", "Tasks assigned or running.")
        paused = GaugeMetricFamily(
            "orchestrator_failover_paused", "1 while failover is paused by a mass drop."
        )
        sessions = GaugeMetricFamily("orchestrator_sessions", "Open Heartbeat sessions (agent streams).")
        counts: collections.Counter[int] = collections.Counter()
        pending_tasks = running_tasks = open_sessions = 0
        failover_paused = False
        for source in list(_sources):
            counts.update(source.agent_statuses())
            workload = source.workload()
            pending_tasks += workload.pending_tasks
            running_tasks += workload.running_tasks
            failover_paused = failover_paused or workload.failover_paused
            open_sessions += source.open_sessions()
        for status in agent_pb2.AgentStatus.values():
            if status != agent_pb2.AGENT_STATUS_UNSPECIFIED:
                name = agent_pb2.AgentStatus.Name(status).removeprefix("AGENT_STATUS_").lower()
                agents.add_metric([name], counts.get(status, 0))
        pending.add_metric([], pending_tasks)
        running.add_metric([], running_tasks)
        paused.add_metric([], 1 if failover_paused else 0)
        sessions.add_metric([], open_sessions)
        yield from (agents, sessions, pending, running, paused)


REGISTRY.register(_StateCollector())


def track(source: StateSource) -> None:
    """Includes a started server in the scrape-time gauges (until it is garbage collected)."""
    _sources.add(source)


def untrack(source: StateSource) -> None:
    _sources.discard(source)


def status_label(status: int) -> str:
    return agent_pb2.AgentStatus.Name(status).removeprefix("AGENT_STATUS_").lower()  # type: ignore[arg-type]


def _export_known_labels() -> None:
    for kind in ("stream", "unary"):
        HEARTBEATS.labels(kind)
    for budget in ("api_calls", "heartbeats", "session_messages"):
        RATE_LIMITED.labels(budget)
    for status in agent_pb2.AgentStatus.values():
        if status != agent_pb2.AGENT_STATUS_UNSPECIFIED:
            TRANSITIONS.labels(status_label(status))
    for name in ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"):
        task_pb2.TaskStatus.Value(f"TASK_STATUS_{name}")  # fails at import if the terminal set changes
        TASKS_FINISHED.labels(name.lower())


_export_known_labels()
