"""Health views of agents and of the orchestrator itself."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator.v1 import agent_pb2, health_pb2
from orchestrator_server import __version__
from orchestrator_server.agents import DEREGISTERED, Registry, build_filter
from orchestrator_server.store import Store
from orchestrator_server.validation import Violations


def agent_health(agent: agent_pb2.Agent) -> health_pb2.AgentHealth:
    health = health_pb2.AgentHealth(
        agent_id=agent.agent_id,
        name=agent.name,
        type=agent.type,
        status=agent.status,
        status_reason=agent.status_reason,
        checks=agent.checks,
        transitions=agent.transitions,
        streaming=agent.session.streaming,
    )
    health.load.CopyFrom(agent.load)
    if agent.HasField("last_heartbeat_at"):
        health.last_heartbeat_at.CopyFrom(agent.last_heartbeat_at)
    if agent.HasField("status_changed_at"):
        health.status_changed_at.CopyFrom(agent.status_changed_at)
    return health


@dataclass
class WorkloadSummary:
    pending_tasks: int = 0
    running_tasks: int = 0
    failover_paused: bool = False
    failover_paused_reason: str = ""
    #: Unfinished tasks are still being restored after a start: the counts are those restored so far.
    restoring: bool = False


class HealthReporter:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        workload: Callable[[], WorkloadSummary],
        revision: Callable[[], int],
    ) -> None:
        self._registry = registry
        self._store = store
        self._workload = workload
        self._revision = revision
        self._started = time.monotonic()

    def get(self, agent_id: str) -> health_pb2.AgentHealth:
        return agent_health(self._registry.get(agent_id))

    def list(self, request: health_pb2.ListAgentHealthRequest) -> tuple[list[health_pb2.AgentHealth], str]:
        violations = Violations()
        agent_filter = build_filter(violations, type=request.type, status=request.status)
        size = violations.page_size("page_size", request.page_size)
        violations.raise_if_any()
        agents, token = self._registry.page(agent_filter, size, request.page_token)
        return [agent_health(agent) for agent in agents], token

    async def system(self) -> health_pb2.GetSystemHealthResponse:
        counts = collections.Counter(
            agent.status for agent in self._registry.agents() if agent.status != DEREGISTERED
        )
        try:
            await self._store.ping()
            store_status = "ok"
        except Exception as error:  # reported, not raised: the point is to say what is wrong
            store_status = f"error: {error}"
        workload = self._workload()
        verdict = "SERVING"
        if store_status != "ok":
            verdict = "NOT_SERVING"
        elif workload.failover_paused or workload.restoring:
            verdict = "DEGRADED"
        response = health_pb2.GetSystemHealthResponse(
            status=verdict,
            agents_by_status=[
                health_pb2.StatusCount(status=status, count=counts.get(status, 0))
                for status in agent_pb2.AgentStatus.values()
                if status not in (agent_pb2.AGENT_STATUS_UNSPECIFIED, DEREGISTERED)
            ],
            total_agents=sum(counts.values()),
            pending_tasks=workload.pending_tasks,
            running_tasks=workload.running_tasks,
            store_status=store_status,
            version=__version__,
            failover_paused=workload.failover_paused,
            failover_paused_reason=workload.failover_paused_reason,
            revision=self._revision(),
        )
        response.uptime.FromSeconds(int(time.monotonic() - self._started))
        return response
