"""HealthService over gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestrator.v1 import health_pb2, health_pb2_grpc
from orchestrator_server.events import EventBus
from orchestrator_server.health import HealthReporter, agent_health
from orchestrator_server.watches import CaughtUp, Changed, Snapshot, watch_agent_health

Context = grpc.aio.ServicerContext[Any, Any]


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
        async with contextlib.aclosing(
            watch_agent_health(self._bus, request.type, request.start_revision)
        ) as items:
            async for item in items:
                if isinstance(item, Changed):
                    yield health_pb2.WatchAgentHealthResponse(
                        revision=item.event.revision,
                        health=agent_health(item.event.agent),
                        previous_status=item.event.previous_status,
                    )
                elif isinstance(item, Snapshot):
                    for agent in item.entries:
                        yield health_pb2.WatchAgentHealthResponse(
                            revision=item.revision,
                            health=agent_health(agent),
                            initial=True,
                            resync=item.after_resync,
                        )
                    yield health_pb2.WatchAgentHealthResponse(revision=item.revision, caught_up=True)
                elif isinstance(item, CaughtUp):
                    yield health_pb2.WatchAgentHealthResponse(revision=item.revision, caught_up=True)
                else:
                    yield health_pb2.WatchAgentHealthResponse(revision=item.revision, resync=True)
