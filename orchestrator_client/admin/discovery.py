"""`AdminClient`'s discovery methods: ready agents by query, their endpoints, picking one, watching."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from orchestrator_client import v1
from orchestrator_client.admin.calls import AdminCalls

_DEFAULT_STRATEGY = v1.LoadBalancingStrategy.LOAD_BALANCING_STRATEGY_UNSPECIFIED


class DiscoveryAdmin(AdminCalls):
    """Finding ready agents and their endpoints, picking one, watching the matching set."""

    @staticmethod
    def _query(
        type: str, capabilities: Iterable[str], label_selector: str, include_degraded: bool
    ) -> v1.AgentQuery:
        return v1.AgentQuery(
            type=type,
            capabilities=capabilities,
            label_selector=label_selector,
            include_degraded=include_degraded,
        )

    def discover_agents(
        self,
        *,
        type: str = "",
        capabilities: Iterable[str] = (),
        label_selector: str = "",
        include_degraded: bool = False,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.Agent]:
        """Ready instances matching the query."""
        query = self._query(type, capabilities, label_selector, include_degraded)

        async def fetch(page_token: str) -> tuple[Sequence[v1.Agent], str]:
            request = v1.DiscoverAgentsRequest(query=query, page_size=page_size, page_token=page_token)
            response = await self._unary(
                lambda: self.discovery.DiscoverAgents, request, timeout=timeout, idempotent=True
            )
            return response.agents, response.next_page_token

        return self._paginate(fetch)

    def list_endpoints(
        self,
        *,
        type: str = "",
        capabilities: Iterable[str] = (),
        label_selector: str = "",
        include_degraded: bool = False,
        endpoint_name: str = "",
        protocol: v1.EndpointProtocol.ValueType = v1.EndpointProtocol.ENDPOINT_PROTOCOL_UNSPECIFIED,
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.AgentEndpoint]:
        query = self._query(type, capabilities, label_selector, include_degraded)

        async def fetch(page_token: str) -> tuple[Sequence[v1.AgentEndpoint], str]:
            request = v1.ListEndpointsRequest(
                query=query,
                endpoint_name=endpoint_name,
                protocol=protocol,
                page_size=page_size,
                page_token=page_token,
            )
            response = await self._unary(
                lambda: self.discovery.ListEndpoints, request, timeout=timeout, idempotent=True
            )
            return response.endpoints, response.next_page_token

        return self._paginate(fetch)

    async def resolve_agent(
        self,
        *,
        type: str = "",
        capabilities: Iterable[str] = (),
        label_selector: str = "",
        include_degraded: bool = False,
        strategy: v1.LoadBalancingStrategy.ValueType = _DEFAULT_STRATEGY,
        hash_key: str = "",
        endpoint_name: str = "",
        timeout: float | None = None,
    ) -> v1.ResolveAgentResponse:
        """Pick one ready instance by a load-balancing strategy (and one of its endpoints)."""
        request = v1.ResolveAgentRequest(
            query=self._query(type, capabilities, label_selector, include_degraded),
            strategy=strategy,
            hash_key=hash_key,
            endpoint_name=endpoint_name,
        )
        return await self._unary(
            lambda: self.discovery.ResolveAgent, request, timeout=timeout, idempotent=True
        )

    def watch_agents(
        self,
        *,
        type: str = "",
        capabilities: Iterable[str] = (),
        label_selector: str = "",
        include_degraded: bool = False,
        start_revision: int = 0,
    ) -> AsyncIterator[v1.WatchAgentsResponse]:
        """A snapshot of the matching agents, then every change, each with its revision, forever.

        After a break the stream resumes after the last revision delivered. A `resync` message
        means that revision is older than the server keeps: drop what you know, a snapshot follows.
        """
        query = self._query(type, capabilities, label_selector, include_degraded)

        def open_stream(revision: int) -> grpc.aio.UnaryStreamCall[Any, v1.WatchAgentsResponse]:
            request = v1.WatchAgentsRequest(query=query, start_revision=revision)
            return self.discovery.WatchAgents(request, metadata=self._metadata)

        def next_revision(message: v1.WatchAgentsResponse, revision: int) -> int:
            if message.WhichOneof("kind") == "resync":
                return 0  # if the snapshot that follows is lost too, ask for a fresh one
            return message.revision or revision

        return self._resumable_watch(open_stream, start_revision, next_revision)
