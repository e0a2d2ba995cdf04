"""`AdminClient`'s agent methods: the registry (register, list, update, drain, deregister) and health."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import field_mask_pb2

from orchestrator_client import v1
from orchestrator_client.admin.calls import AdminCalls


class AgentAdmin(AdminCalls):
    """Registering, listing, changing, draining and deregistering agents; their health."""

    async def register_agent(
        self,
        name: str,
        instance_id: str,
        type: str,
        *,
        version: str = "",
        capabilities: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        endpoints: Iterable[v1.Endpoint] = (),
        max_concurrent_tasks: int = 0,
        timeout: float | None = None,
    ) -> v1.RegisterAgentResponse:
        """Register an agent (idempotent on name + instance_id; each call issues a fresh token)."""
        request = v1.RegisterAgentRequest(
            name=name,
            instance_id=instance_id,
            type=type,
            version=version,
            capabilities=capabilities,
            labels=labels,
            endpoints=endpoints,
            max_concurrent_tasks=max_concurrent_tasks,
        )
        return await self._unary(
            lambda: self.registry.RegisterAgent, request, timeout=timeout, idempotent=True
        )

    async def get_agent(self, agent_id: str, *, timeout: float | None = None) -> v1.Agent:
        request = v1.GetAgentRequest(agent_id=agent_id)
        response = await self._unary(
            lambda: self.registry.GetAgent, request, timeout=timeout, idempotent=True
        )
        return response.agent

    def list_agents(
        self,
        *,
        type: str = "",
        status: v1.AgentStatus.ValueType = v1.AgentStatus.AGENT_STATUS_UNSPECIFIED,
        capability: str = "",
        label_selector: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.Agent]:
        """Every matching agent, oldest registration first, fetched a page at a time."""

        async def fetch(page_token: str) -> tuple[Sequence[v1.Agent], str]:
            request = v1.ListAgentsRequest(
                type=type,
                status=status,
                capability=capability,
                label_selector=label_selector,
                page_size=page_size,
                page_token=page_token,
            )
            response = await self._unary(
                lambda: self.registry.ListAgents, request, timeout=timeout, idempotent=True
            )
            return response.agents, response.next_page_token

        return self._paginate(fetch)

    async def update_agent(
        self,
        agent_id: str,
        *,
        version: str | None = None,
        capabilities: Iterable[str] | None = None,
        labels: Mapping[str, str] | None = None,
        endpoints: Iterable[v1.Endpoint] | None = None,
        max_concurrent_tasks: int | None = None,
        timeout: float | None = None,
    ) -> v1.Agent:
        """Change the given attributes (only those not None); lists and maps are replaced whole."""
        update = v1.AgentUpdate()
        mask: list[str] = []
        if version is not None:
            update.version = version
            mask.append("version")
        if capabilities is not None:
            update.capabilities.extend(capabilities)
            mask.append("capabilities")
        if labels is not None:
            update.labels.update(labels)
            mask.append("labels")
        if endpoints is not None:
            update.endpoints.extend(endpoints)
            mask.append("endpoints")
        if max_concurrent_tasks is not None:
            update.max_concurrent_tasks = max_concurrent_tasks
            mask.append("max_concurrent_tasks")
        if not mask:
            raise ValueError("update_agent needs at least one attribute to change")
        request = v1.UpdateAgentRequest(
            agent_id=agent_id, update=update, update_mask=field_mask_pb2.FieldMask(paths=mask)
        )
        response = await self._unary(
            lambda: self.registry.UpdateAgent, request, timeout=timeout, idempotent=False
        )
        return response.agent

    async def drain_agent(self, agent_id: str, reason: str = "", *, timeout: float | None = None) -> v1.Agent:
        request = v1.DrainAgentRequest(agent_id=agent_id, reason=reason)
        response = await self._unary(
            lambda: self.registry.DrainAgent, request, timeout=timeout, idempotent=False
        )
        return response.agent

    async def undrain_agent(self, agent_id: str, *, timeout: float | None = None) -> v1.Agent:
        request = v1.UndrainAgentRequest(agent_id=agent_id)
        response = await self._unary(
            lambda: self.registry.UndrainAgent, request, timeout=timeout, idempotent=False
        )
        return response.agent

    async def deregister_agent(self, agent_id: str, *, timeout: float | None = None) -> v1.Agent:
        request = v1.DeregisterAgentRequest(agent_id=agent_id)
        response = await self._unary(
            lambda: self.registry.DeregisterAgent, request, timeout=timeout, idempotent=False
        )
        return response.agent

    # ------------------------------------------------------------------------------------- health

    async def get_agent_health(self, agent_id: str, *, timeout: float | None = None) -> v1.AgentHealth:
        request = v1.GetAgentHealthRequest(agent_id=agent_id)
        response = await self._unary(
            lambda: self.health.GetAgentHealth, request, timeout=timeout, idempotent=True
        )
        return response.health

    def list_agent_health(
        self,
        *,
        status: v1.AgentStatus.ValueType = v1.AgentStatus.AGENT_STATUS_UNSPECIFIED,
        type: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.AgentHealth]:
        async def fetch(page_token: str) -> tuple[Sequence[v1.AgentHealth], str]:
            request = v1.ListAgentHealthRequest(
                status=status, type=type, page_size=page_size, page_token=page_token
            )
            response = await self._unary(
                lambda: self.health.ListAgentHealth, request, timeout=timeout, idempotent=True
            )
            return response.agents, response.next_page_token

        return self._paginate(fetch)

    async def get_system_health(self, *, timeout: float | None = None) -> v1.GetSystemHealthResponse:
        request = v1.GetSystemHealthRequest()
        return await self._unary(
            lambda: self.health.GetSystemHealth, request, timeout=timeout, idempotent=True
        )

    def watch_agent_health(
        self, *, type: str = "", start_revision: int = 0
    ) -> AsyncIterator[v1.WatchAgentHealthResponse]:
        """The current statuses (`initial`, ended by `caught_up`), then every transition, forever.

        After a break the stream resumes after the last transition delivered. A message with
        `resync` set means the server no longer has that history: drop what you know, the initial
        state follows.
        """

        def open_stream(revision: int) -> grpc.aio.UnaryStreamCall[Any, v1.WatchAgentHealthResponse]:
            request = v1.WatchAgentHealthRequest(type=type, start_revision=revision)
            return self.health.WatchAgentHealth(request, metadata=self._metadata)

        def next_revision(message: v1.WatchAgentHealthResponse, revision: int) -> int:
            if message.resync:
                return 0
            # Inside the initial state the cursor stays put, so a break there replays all of it.
            if message.initial and not message.caught_up:
                return revision
            return message.revision or revision

        return self._resumable_watch(open_stream, start_revision, next_revision)
