"""`AdminClient`: agents, health, discovery and tasks for operators and task submitters.

Every unary method takes `timeout` (seconds, the whole call's deadline; the client's default when
None). Methods whose effect does not depend on how often they run (gets, lists, discovery,
RegisterAgent, and CreateTask with an idempotency key) are retried by the client's `Retry` (by
default on UNAVAILABLE, with exponential backoff and full jitter, each attempt getting what is left
of the deadline, as google-api-core does); other calls are tried once, because a retry after a lost
answer could act twice. Paginated lists are async iterators that fetch pages as they are consumed.
Watches are async iterators that reconnect on their own (on the transient codes of
`orchestrator_client.retry`) and resume from the last revision they delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import duration_pb2, field_mask_pb2

from orchestrator_client import v1
from orchestrator_client.channel import ConnectionOptions
from orchestrator_client.errors import OrchestratorError, from_grpc_error
from orchestrator_client.retry import NO_RETRY, TRANSIENT_CODES, Backoff, Retry, Sleep
from orchestrator_client.targets import Targets

if TYPE_CHECKING:
    from orchestrator_client.v1 import (
        DiscoveryServiceAsyncStub,
        HealthServiceAsyncStub,
        RegistryServiceAsyncStub,
        TasksServiceAsyncStub,
    )

Request = TypeVar("Request")
Response = TypeVar("Response")
Item = TypeVar("Item")

TERMINAL_TASK_STATUSES = frozenset(
    {
        v1.TaskStatus.TASK_STATUS_SUCCEEDED,
        v1.TaskStatus.TASK_STATUS_FAILED,
        v1.TaskStatus.TASK_STATUS_CANCELLED,
        v1.TaskStatus.TASK_STATUS_TIMED_OUT,
    }
)

_DEFAULT_STRATEGY = v1.LoadBalancingStrategy.LOAD_BALANCING_STRATEGY_UNSPECIFIED


def _duration(seconds: float | None) -> duration_pb2.Duration | None:
    if seconds is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


class AdminClient:
    """Asyncio client of the orchestrator's admin surface. Use as `async with AdminClient(...)`."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        api_key: str | None = None,
        connection: ConnectionOptions | None = None,
        timeout: float | None = 10.0,
        retry: Retry | None = None,
        watch_backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._targets = Targets(target)
        self.targets = self._targets.all
        """Every replica this client may use; it moves to the next when one is UNAVAILABLE."""
        self.target = self._targets.current
        """The replica it uses now."""
        self.timeout = timeout
        self._retry = retry or Retry()
        # A watch lives until its caller stops reading: no deadline, and every transient break is
        # resumed; a code outside TRANSIENT_CODES (NOT_FOUND, PERMISSION_DENIED, ...) would break
        # the reopened stream the same way and is raised.
        self._watch_retry = Retry(
            retryable_codes=TRANSIENT_CODES,
            backoff=watch_backoff or Backoff(),
            on_error=self._retry.on_error,
            sleep=sleep,
        )
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._connection = connection or ConnectionOptions()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._use(self.target)

    def _use(self, target: str) -> None:
        if target not in self._channels:
            self._channels[target] = self._connection.create_channel(target)
        self.target = target
        self._channel = self._channels[target]
        self.registry: RegistryServiceAsyncStub = v1.RegistryServiceStub(self._channel)
        self.health: HealthServiceAsyncStub = v1.HealthServiceStub(self._channel)
        self.discovery: DiscoveryServiceAsyncStub = v1.DiscoveryServiceStub(self._channel)
        self.tasks: TasksServiceAsyncStub = v1.TasksServiceStub(self._channel)
        """The raw stubs (of the replica in use), for anything the methods below do not cover."""

    def _move_on(self, error: OrchestratorError | None) -> None:
        """After UNAVAILABLE (the replica is down, draining or cut off from its database), or a watch
        the replica ended (it is going away: None), the next call, or the retry of this one, goes
        to the next replica."""
        if self._targets.several and (error is None or error.grpc_code == grpc.StatusCode.UNAVAILABLE):
            self._use(self._targets.advance())

    async def close(self) -> None:
        await asyncio.gather(*(channel.close(None) for channel in self._channels.values()))

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------- plumbing

    async def _unary(
        self,
        method: Callable[[], grpc.aio.UnaryUnaryMultiCallable[Request, Response]],
        request: Request,
        *,
        timeout: float | None,
        idempotent: bool,
    ) -> Response:
        async def attempt(remaining: float | None) -> Response:
            try:
                # `method` is looked up again each time: a retry goes to the replica moved on to.
                return await method()(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as err:
                self._move_on(from_grpc_error(err))
                raise

        policy = self._retry if idempotent else NO_RETRY
        return await policy.with_timeout(self.timeout if timeout is None else timeout).run(attempt)

    async def _paginate(
        self, fetch: Callable[[str], Awaitable[tuple[Sequence[Item], str]]]
    ) -> AsyncIterator[Item]:
        page_token = ""
        while True:
            items, page_token = await fetch(page_token)
            for item in items:
                yield item
            if not page_token:
                return

    async def _resumable_watch(
        self,
        open_stream: Callable[[int], grpc.aio.UnaryStreamCall[Any, Response]],
        start_revision: int,
        next_revision: Callable[[Response, int], int],
    ) -> AsyncIterator[Response]:
        """Yield a watch stream's messages; on a break, reopen it from the last revision delivered."""
        revision = start_revision
        failures = 0
        while True:
            call = open_stream(revision)
            error = None
            try:
                async for message in call:
                    failures = 0
                    revision = next_revision(message, revision)
                    yield message
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                if not self._watch_retry.retryable(error):
                    raise error from err
            finally:
                call.cancel()
            self._move_on(error)
            # Ended, cleanly (the server shutting down) or not: resume after a jittered pause.
            await self._watch_retry.wait(failures, error)
            failures += 1

    # ------------------------------------------------------------------------------------- agents

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

    # ---------------------------------------------------------------------------------- discovery

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

    # -------------------------------------------------------------------------------------- tasks

    async def create_task(
        self,
        task_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        required_capabilities: Iterable[str] = (),
        label_selector: str = "",
        target_agent_id: str = "",
        priority: int = 0,
        queue_timeout: float | None = None,
        run_timeout: float | None = None,
        max_attempts: int = 0,
        idempotency_key: str = "",
        routing_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> v1.Task:
        """Create a task. With an `idempotency_key` the call is retried safely (the same key and spec
        from the same credential return the same task; the same key with another spec raises the
        ALREADY_EXISTS error); without one it is tried once."""
        spec = v1.TaskSpec(
            type=task_type,
            required_capabilities=required_capabilities,
            label_selector=label_selector,
            target_agent_id=target_agent_id,
            priority=priority,
            queue_timeout=_duration(queue_timeout),
            run_timeout=_duration(run_timeout),
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
            routing_key=routing_key,
            labels=labels,
        )
        if payload is not None:
            spec.payload.update(payload)
        request = v1.CreateTaskRequest(spec=spec)
        response = await self._unary(
            lambda: self.tasks.CreateTask, request, timeout=timeout, idempotent=bool(idempotency_key)
        )
        return response.task

    async def get_task(self, task_id: str, *, timeout: float | None = None) -> v1.Task:
        request = v1.GetTaskRequest(task_id=task_id)
        response = await self._unary(lambda: self.tasks.GetTask, request, timeout=timeout, idempotent=True)
        return response.task

    def list_tasks(
        self,
        *,
        status: v1.TaskStatus.ValueType = v1.TaskStatus.TASK_STATUS_UNSPECIFIED,
        type: str = "",
        agent_id: str = "",
        page_size: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[v1.Task]:
        """Every matching task, newest first, fetched a page at a time."""

        async def fetch(page_token: str) -> tuple[Sequence[v1.Task], str]:
            request = v1.ListTasksRequest(
                status=status, type=type, agent_id=agent_id, page_size=page_size, page_token=page_token
            )
            response = await self._unary(
                lambda: self.tasks.ListTasks, request, timeout=timeout, idempotent=True
            )
            return response.tasks, response.next_page_token

        return self._paginate(fetch)

    async def assign_task(self, task_id: str, agent_id: str, *, timeout: float | None = None) -> v1.Task:
        request = v1.AssignTaskRequest(task_id=task_id, agent_id=agent_id)
        response = await self._unary(
            lambda: self.tasks.AssignTask, request, timeout=timeout, idempotent=False
        )
        return response.task

    async def cancel_task(self, task_id: str, reason: str = "", *, timeout: float | None = None) -> v1.Task:
        request = v1.CancelTaskRequest(task_id=task_id, reason=reason)
        response = await self._unary(
            lambda: self.tasks.CancelTask, request, timeout=timeout, idempotent=False
        )
        return response.task

    async def watch_task(self, task_id: str) -> AsyncIterator[v1.Task]:
        """The task now, then after every change, until it is terminal; survives disconnects."""

        def open_stream(revision: int) -> grpc.aio.UnaryStreamCall[Any, v1.WatchTaskResponse]:
            return self.tasks.WatchTask(v1.WatchTaskRequest(task_id=task_id), metadata=self._metadata)

        def next_revision(message: v1.WatchTaskResponse, revision: int) -> int:
            return message.revision or revision

        last_revision = -1
        async for message in self._resumable_watch(open_stream, 0, next_revision):
            # A reopened watch starts with the current task, which the caller may have seen.
            if message.task.revision and message.task.revision == last_revision:
                continue
            last_revision = message.task.revision
            yield message.task
            if message.task.status in TERMINAL_TASK_STATUSES:
                return

    async def wait_for_result(self, task_id: str, *, timeout: float | None = None) -> v1.Task:
        """Wait until the task is terminal and return it (check `status`, `result`, `error`).

        Raises `TimeoutError` after `timeout` seconds (None: wait as long as it takes).
        """
        latest: v1.Task | None = None
        async with asyncio.timeout(timeout):
            async for task in self.watch_task(task_id):
                latest = task
        assert latest is not None, "watch_task ends only after yielding the terminal task"
        return latest
