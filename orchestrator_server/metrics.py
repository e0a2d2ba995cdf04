"""Prometheus metrics of the orchestrator.

Counters and histograms are module-level (one set per process, as Prometheus expects); gauges that
describe state (agents by status, queue depth, failover pause) are computed at scrape time from the
live servers, so nothing on the hot path keeps them up to date.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.v1 import agent_pb2
from orchestrator_server.health import WorkloadSummary

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
TASKS_FINISHED = Counter(
    "orchestrator_tasks_finished_total", "Tasks that reached a terminal state.", ["status"]
)


class StateSource(Protocol):
    """What a running server exposes for the scrape-time gauges."""

    def agent_statuses(self) -> Iterable[int]: ...

    def workload(self) -> WorkloadSummary: ...


_sources: weakref.WeakSet[StateSource] = weakref.WeakSet()


class _StateCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        agents = GaugeMetricFamily("orchestrator_agents", "Registered agents by status.", labels=["status"])
        pending = GaugeMetricFamily("orchestrator_tasks_pending", "Tasks waiting for placement.")
        running = GaugeMetricFamily("orchestrator_tasks_running", "Tasks assigned or running.")
        paused = GaugeMetricFamily(
            "orchestrator_failover_paused", "1 while failover is paused by a mass drop."
        )
        counts: collections.Counter[int] = collections.Counter()
        totals = WorkloadSummary()
        for source in list(_sources):
            counts.update(source.agent_statuses())
            workload = source.workload()
            totals.pending_tasks += workload.pending_tasks
            totals.running_tasks += workload.running_tasks
            totals.failover_paused = totals.failover_paused or workload.failover_paused
        for status in agent_pb2.AgentStatus.values():
            if status != agent_pb2.AGENT_STATUS_UNSPECIFIED:
                name = agent_pb2.AgentStatus.Name(status).removeprefix("AGENT_STATUS_").lower()
                agents.add_metric([name], counts.get(status, 0))
        pending.add_metric([], totals.pending_tasks)
        running.add_metric([], totals.running_tasks)
        paused.add_metric([], 1 if totals.failover_paused else 0)
        yield from (agents, pending, running, paused)


REGISTRY.register(_StateCollector())


def track(source: StateSource) -> None:
    """Includes a started server in the scrape-time gauges (until it is garbage collected)."""
    _sources.add(source)


def untrack(source: StateSource) -> None:
    _sources.discard(source)


def status_label(status: int) -> str:
    return agent_pb2.AgentStatus.Name(status).removeprefix("AGENT_STATUS_").lower()  # type: ignore[arg-type]
