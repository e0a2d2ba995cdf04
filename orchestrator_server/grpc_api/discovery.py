"""DiscoveryService over gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestrator.v1 import discovery_pb2, discovery_pb2_grpc
from orchestrator_server.discovery import Discovery
from orchestrator_server.events import EventBus
from orchestrator_server.grpc_api.pages import EncodedMethods, PageEncoder
from orchestrator_server.watches import AgentChange, Resync, Snapshot, watch_agents

Context = grpc.aio.ServicerContext[Any, Any]
_DISCOVER_AGENTS = PageEncoder(discovery_pb2.DiscoverAgentsResponse.DESCRIPTOR)


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, discovery: Discovery, bus: EventBus) -> None:
        self._discovery = discovery
        self._bus = bus

    async def DiscoverAgents(
        self, request: discovery_pb2.DiscoverAgentsRequest, context: Context
    ) -> discovery_pb2.DiscoverAgentsResponse:
        agents, token = self._discovery.discover(request.query, request.page_size, request.page_token)
        return discovery_pb2.DiscoverAgentsResponse(agents=agents, next_page_token=token)

    async def _discover_agents_encoded(
        self, request: discovery_pb2.DiscoverAgentsRequest, context: Context
    ) -> bytes:
        agents, token = self._discovery.discover(request.query, request.page_size, request.page_token)
        return _DISCOVER_AGENTS.encode(agents, token, self._discovery.encoded)

    def encoded_methods(self) -> EncodedMethods:
        """What the in-process gateway may take as bytes (`grpc_api.pages`)."""
        return {"DiscoverAgents": self._discover_agents_encoded}

    async def ListEndpoints(
        self, request: discovery_pb2.ListEndpointsRequest, context: Context
    ) -> discovery_pb2.ListEndpointsResponse:
        endpoints, token = self._discovery.endpoints(request)
        return discovery_pb2.ListEndpointsResponse(endpoints=endpoints, next_page_token=token)

    async def ResolveAgent(
        self, request: discovery_pb2.ResolveAgentRequest, context: Context
    ) -> discovery_pb2.ResolveAgentResponse:
        agent, endpoint, candidates = self._discovery.resolve(request)
        return discovery_pb2.ResolveAgentResponse(agent=agent, endpoint=endpoint, candidates=candidates)

    async def WatchAgents(
        self, request: discovery_pb2.WatchAgentsRequest, context: Context
    ) -> AsyncIterator[discovery_pb2.WatchAgentsResponse]:
        async with contextlib.aclosing(
            watch_agents(self._bus, request.query, request.start_revision)
        ) as items:
            async for item in items:
                if isinstance(item, AgentChange):
                    yield discovery_pb2.WatchAgentsResponse(
                        revision=item.event.revision,
                        delta=discovery_pb2.AgentDelta(
                            type=item.event.type,
                            agent=item.event.agent,
                            previous_status=item.event.previous_status,
                            left_query=item.left_query,
                        ),
                    )
                elif isinstance(item, Snapshot):
                    yield discovery_pb2.WatchAgentsResponse(
                        revision=item.revision, snapshot=discovery_pb2.AgentSnapshot(agents=item.entries)
                    )
                elif isinstance(item, Resync):
                    yield discovery_pb2.WatchAgentsResponse(
                        revision=item.revision,
                        resync=discovery_pb2.ResyncRequired(
                            oldest_revision=item.oldest_revision, reason=item.reason
                        ),
                    )
