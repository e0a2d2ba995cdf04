"""DiscoveryService over gRPC."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from orchestrator.v1 import discovery_pb2, discovery_pb2_grpc, event_pb2
from orchestrator_server.agents import DEREGISTERED
from orchestrator_server.discovery import Discovery
from orchestrator_server.events import CaughtUp, EventBus, ResyncNeeded
from orchestrator_server.validation import Violations

Context = grpc.aio.ServicerContext[Any, Any]


class DiscoveryServicer(discovery_pb2_grpc.DiscoveryServiceServicer):
    def __init__(self, discovery: Discovery, bus: EventBus) -> None:
        self._discovery = discovery
        self._bus = bus

    async def DiscoverAgents(
        self, request: discovery_pb2.DiscoverAgentsRequest, context: Context
    ) -> discovery_pb2.DiscoverAgentsResponse:
        agents, token = self._discovery.discover(request.query, request.page_size, request.page_token)
        return discovery_pb2.DiscoverAgentsResponse(agents=agents, next_page_token=token)

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
        violations = Violations()
        query_filter = self._discovery.query_filter(request.query, violations)
        if request.start_revision < 0:
            violations.add("start_revision", "must not be negative")
        violations.raise_if_any()
        # Watchers see every status (DOWN is the news they wait for), deregistration included.
        watch_filter = dataclasses.replace(query_filter, include_deregistered=True)

        # Agents the watcher holds, to tell it when one stops matching. After a resume we do not
        # know its set, so every agent changed during the replay is reported, matching or leaving.
        known: set[str] = set()
        replaying = request.start_revision > 0

        def concerns(event: event_pb2.Event) -> bool:
            return event.HasField("agent") and (
                replaying or event.agent.agent_id in known or watch_filter.matches(event.agent)
            )

        after = request.start_revision
        while True:
            if after == 0:
                after = self._bus.revision
                snapshot = [
                    agent
                    for agent in self._bus.committed_agents.values()
                    if agent.status != DEREGISTERED and query_filter.matches(agent)
                ]
                known = {agent.agent_id for agent in snapshot}
                replaying = False
                yield discovery_pb2.WatchAgentsResponse(
                    revision=after, snapshot=discovery_pb2.AgentSnapshot(agents=snapshot)
                )
            try:
                async for item in self._bus.watch_marked(after, concerns):
                    if isinstance(item, CaughtUp):
                        replaying = False
                        continue
                    agent_id = item.agent.agent_id
                    matching = watch_filter.matches(item.agent)
                    if matching:
                        known.add(agent_id)
                    elif agent_id in known or replaying:
                        known.discard(agent_id)
                    else:
                        continue  # queued while replaying; the watcher never had it
                    yield discovery_pb2.WatchAgentsResponse(
                        revision=item.revision,
                        delta=discovery_pb2.AgentDelta(
                            type=item.type,
                            agent=item.agent,
                            previous_status=item.previous_status,
                            left_query=not matching,
                        ),
                    )
            except ResyncNeeded as resync:
                yield discovery_pb2.WatchAgentsResponse(
                    revision=self._bus.revision,
                    resync=discovery_pb2.ResyncRequired(
                        oldest_revision=resync.oldest_revision, reason=resync.reason
                    ),
                )
                after = 0
            else:
                return  # the server is shutting down; the watcher resumes from its revision
