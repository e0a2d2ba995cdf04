"""How `AdminClient` calls: the replica in use and moving past an unavailable one, retries within
the deadline, pages fetched as consumed, and watches that resume from the last revision delivered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self, TypeVar

import grpc

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


class AdminCalls:
    """The replicas, their channels and stubs, and how every call is made; `AdminClient` adds the
    methods, by concern (agents.py, discovery.py, tasks.py)."""

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

    async def __aenter__(self) -> Self:
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
