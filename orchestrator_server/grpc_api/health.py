"""HealthService over gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestrator.v1 import event_pb2, health_pb2, health_pb2_grpc
from orchestrator_server.agents import DEREGISTERED
from orchestrator_server.events import CaughtUp, EventBus, ResyncNeeded
from orchestrator_server.health import HealthReporter, agent_health
from orchestrator_server.validation import Violations

Context = grpc.aio.ServicerContext[Any, Any]

TRANSITIONS = frozenset(
    {
        event_pb2.EVENT_TYPE_AGENT_REGISTERED,
        event_pb2.EVENT_TYPE_AGENT_STATUS_CHANGED,
        event_pb2.EVENT_TYPE_AGENT_DEREGISTERED,
    }
)


class HealthServicer(health_pb2_grpc.HealthServiceServicer):
    def __init__(self, reporter: HealthReporter, bus: EventBus) -> None:
        self._reporter = reporter
        self._bus = bus

    async def GetAgentHealth(
        self, request: health_pb2.GetAgentHealthRequest, context: Context
    ) -> health_pb2.GetAgentHealthResponse:
        return health_pb2.GetAgentHealthResponse(health=self._reporter.get(request.agent_id))

    async def ListAgentHealth(
        self, request: health_pb2.ListAgentHealthRequest, context: Context
    ) -> health_pb2.ListAgentHealthResponse:
        agents, token = self._reporter.list(request)
        return health_pb2.ListAgentHealthResponse(agents=agents, next_page_token=token)

    async def GetSystemHealth(
        self, request: health_pb2.GetSystemHealthRequest, context: Context
    ) -> health_pb2.GetSystemHealthResponse:
        return await self._reporter.system()

    async def WatchAgentHealth(
        self, request: health_pb2.WatchAgentHealthRequest, context: Context
    ) -> AsyncIterator[health_pb2.WatchAgentHealthResponse]:
        violations = Violations()
        violations.name("type", request.type, required=False)
        if request.start_revision < 0:
            violations.add("start_revision", "must not be negative")
        violations.raise_if_any()

        def concerns(event: event_pb2.Event) -> bool:
            return (
                event.type in TRANSITIONS
                and event.HasField("agent")
                and (not request.type or event.agent.type == request.type)
            )

        after = request.start_revision
        resync = False
        while True:
            # Resuming: the missed transitions are replayed first, then caught_up is sent.
            replaying = after != 0
            if not replaying:
                after = self._bus.revision
                for agent in list(self._bus.committed_agents.values()):
                    if agent.status != DEREGISTERED and (not request.type or agent.type == request.type):
                        yield health_pb2.WatchAgentHealthResponse(
                            revision=after, health=agent_health(agent), initial=True, resync=resync
                        )
                yield health_pb2.WatchAgentHealthResponse(revision=after, caught_up=True)
            try:
                async for item in self._bus.watch_marked(after, concerns):
                    if isinstance(item, CaughtUp):
                        if replaying:
                            yield health_pb2.WatchAgentHealthResponse(revision=item.revision, caught_up=True)
                        continue
                    yield health_pb2.WatchAgentHealthResponse(
                        revision=item.revision,
                        health=agent_health(item.agent),
                        previous_status=item.previous_status,
                    )
            except ResyncNeeded:
                yield health_pb2.WatchAgentHealthResponse(revision=self._bus.revision, resync=True)
                after, resync = 0, True
            else:
                return  # the server is shutting down; the watcher resumes from its revision
