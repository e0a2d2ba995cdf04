"""The agent's session: register, hello, beats, the server's messages, and reconnecting.

`_SessionKeeper._maintain_session` keeps one Heartbeat session open for the agent's whole life:

* the stream breaks or the server goes away: reconnect (to the next replica when several targets
  are given), hello again with the attempts still held, so the server keeps them
  (`kept_attempt_ids`); the pause before it is `ReconnectPacing`'s (orchestrator_client.retry);
* the server forgot the agent or its credential (hello answered NOT_FOUND / UNAUTHENTICATED):
  register again (idempotent on name + instance) and reopen;
* the server asks to reconnect (its shutdown), or refuses the session while it drains or has lost
  its database (UNAVAILABLE with a retry hint): move on, paced by the hint;
* another live process holds the same name + instance (IDENTITY_IN_USE): stop, never fight over
  the identity.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
from google.protobuf import duration_pb2

from orchestrator_client import v1
from orchestrator_client.agent.attempts import _AttemptRunner, _SessionState
from orchestrator_client.agent.host import host_load
from orchestrator_client.channel import ConnectionOptions
from orchestrator_client.errors import OrchestratorError, from_grpc_error
from orchestrator_client.retry import ReconnectPacing, Retry
from orchestrator_client.targets import Targets

if TYPE_CHECKING:
    from orchestrator_client.v1 import RegistryServiceAsyncStub

log = logging.getLogger("orchestrator_client.agent")

CheckFunction = Callable[[], bool | Awaitable[bool]]

# The session answers these when it no longer knows the agent or its credential: register again.
_REREGISTER_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED})

# The end-of-stream marker of `call.read()`; grpc-stubs does not declare it.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

# The server's reason (google.rpc.ErrorInfo) when another live process holds this agent's identity.
IDENTITY_IN_USE = "IDENTITY_IN_USE"


def _planned_pause(error: OrchestratorError) -> float | None:
    """The wait a draining server asked for (UNAVAILABLE with RetryInfo), else None."""
    return error.retry_after if error.grpc_code == grpc.StatusCode.UNAVAILABLE else None


@dataclass
class _SessionEnd:
    """How a session ended, which decides where the next one goes and how long to wait for it."""

    welcomed: bool
    # Set when the server planned the break (reconnect request, drain refusal): its wait hint.
    reconnect_after: float | None = None
    # Another address the server's reconnect request named.
    redirect: str = ""
    reregister: bool = False
    reason: str = ""
    # An error no reconnect can fix (the identity is held by another live process).
    fatal: OrchestratorError | None = None
    # The error that ended it, if one did: its RetryInfo, if any, bounds the next pause from below.
    error: OrchestratorError | None = None


class _SessionKeeper(_AttemptRunner):
    """The session half of `Agent` (its state is set up in `Agent.__init__`)."""

    target: str
    instance_id: str
    type: str
    version: str
    capabilities: list[str]
    labels: dict[str, str]
    endpoints: list[v1.Endpoint]
    incarnation: str
    agent_id: str
    heartbeat_interval: float
    heartbeat_timeout: float
    epoch: int
    sessions_opened: int
    draining: bool
    last_ack_status: v1.AgentStatus.ValueType
    _targets: Targets
    _api_key: str | None
    _connection: ConnectionOptions
    _reconnect: Retry
    _pacing: ReconnectPacing
    _checks: dict[str, CheckFunction]
    _channel: grpc.aio.Channel | None
    _registry: RegistryServiceAsyncStub | None
    _connected: asyncio.Event
    _background: set[asyncio.Task[None]]

    def _open_channel(self, target: str) -> None:
        old = self._channel
        self.target = target
        self._channel = self._connection.create_channel(target)
        self._registry = v1.RegistryServiceStub(self._channel)
        self._tasks = v1.TasksServiceStub(self._channel)
        if old is not None:
            # Calls still running on the old channel are cancelled; reports retry on the new one.
            closing = asyncio.create_task(old.close(grace=self._call_timeout))
            self._background.add(closing)
            closing.add_done_callback(self._background.discard)

    def _next_target(self, end: _SessionEnd) -> bool:
        """Choose where the next session goes; True when that is another replica than the last."""
        previous = self.target
        if end.redirect:
            self._targets.redirect(end.redirect)
        elif self._targets.several and not end.reregister:
            # Not the replica that just failed or went away: it would refuse again, or hold the
            # agent in a session it can no longer serve. (A forgotten credential is renewed where
            # it was refused.)
            self._targets.advance()
        elsewhere = self._targets.current != previous
        if elsewhere or not end.reregister:
            # A fresh channel even to the same server: the old one may sit in grpc core's own
            # reconnect backoff (up to `max_reconnect_backoff`), failing every call at once until
            # it ends, so an agent whose pause ended right after the server came back would fail
            # again and draw another pause. With its own connection (a local subchannel pool) the
            # new channel connects when the pacing says so.
            self._open_channel(self._targets.current)
        return elsewhere

    def _api_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._api_key}"),) if self._api_key else ()

    # ----------------------------------------------------------------------------- session keeper

    async def _register(self) -> None:
        assert self._registry is not None
        request = v1.RegisterAgentRequest(
            name=self.name,
            instance_id=self.instance_id,
            type=self.type,
            version=self.version,
            capabilities=self.capabilities,
            labels=self.labels,
            endpoints=self.endpoints,
            max_concurrent_tasks=self.max_concurrent_tasks,
            # Placement offers this agent only the types it has handlers for.
            task_types=sorted(self._handlers),
        )
        response = await self._registry.RegisterAgent(
            request, metadata=self._api_metadata(), timeout=self._call_timeout
        )
        self.agent_id = response.agent.agent_id
        self._token = response.agent_token
        self._apply_intervals(response.heartbeat_interval, response.heartbeat_timeout)
        log.info("registered %s/%s as %s", self.name, self.instance_id, self.agent_id)

    def _apply_intervals(self, interval: duration_pb2.Duration, timeout: duration_pb2.Duration) -> None:
        if interval.seconds or interval.nanos:
            self.heartbeat_interval = interval.ToTimedelta().total_seconds()
        if timeout.seconds or timeout.nanos:
            self.heartbeat_timeout = timeout.ToTimedelta().total_seconds()

    async def _maintain_session(self) -> BaseException | None:
        """Keep one session open for the agent's whole life; the heart of the resilience story.

        Returns the error that stops the agent (one no reconnect can fix), or None on a stop.
        """
        while not self._stopping:
            try:
                if self._token is None:
                    await self._register()
                end = await self._run_session()
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                if not self._reconnect.retryable(error):
                    error.__cause__ = err
                    return error
                end = _SessionEnd(
                    welcomed=False,
                    reason=f"registration failed: {error}",
                    reconnect_after=_planned_pause(error),
                    error=error,
                )
            except OSError as err:  # e.g. unreadable TLS files: nothing a retry can fix
                return err
            if end.fatal is not None:
                return end.fatal
            if self._stopping:
                return None
            if end.reregister:
                self._token = None
            left = self.target
            elsewhere = self._next_target(end)
            pause = self._pacing.pause(
                welcomed=end.welcomed, hint=end.reconnect_after, error=end.error, elsewhere=elsewhere
            )
            log.warning(
                "session with %s ended (%s); reconnecting to %s in %.2fs",
                left,
                end.reason,
                self.target,
                pause,
            )
            await self._reconnect.sleep(pause)
        return None

    async def _run_session(self) -> _SessionEnd:
        assert self._registry is not None
        session = _SessionState()
        session.outbox.put_nowait(
            v1.HeartbeatRequest(
                hello=v1.SessionHello(
                    agent_id=self.agent_id,
                    agent_token=self._token or "",
                    running_attempt_ids=sorted(self._attempts),
                    incarnation=self.incarnation,
                )
            )
        )
        call = self._registry.Heartbeat(self._outgoing(session), metadata=self._agent_metadata())
        beats: asyncio.Task[None] | None = None
        welcomed = False
        try:
            # The server may take up to the heartbeat timeout to notice a silent stream; use the
            # same bound for its answer to the hello.
            first = await self._read(call)
            if first is _EOF:
                return _SessionEnd(welcomed=False, reason="stream closed before welcome")
            response = cast(v1.HeartbeatResponse, first)
            if response.WhichOneof("message") != "welcome":
                return _SessionEnd(welcomed=False, reason="first message was not a welcome")
            welcomed = True
            self._on_welcome(response.welcome, session)
            beats = asyncio.create_task(self._beat(session))
            while True:
                # Acks come every heartbeat interval: silence for the timeout means a dead stream,
                # whatever TCP says.
                message = await self._read(call)
                if message is _EOF:
                    return _SessionEnd(welcomed=True, reason="server closed the stream")
                end = self._on_server_message(cast(v1.HeartbeatResponse, message), session)
                if end is not None:
                    return end
        except grpc.RpcError as err:
            error = from_grpc_error(err)
            info = error.error_info
            if info is not None and info.reason == IDENTITY_IN_USE:
                error.__cause__ = err
                return _SessionEnd(welcomed=welcomed, fatal=error, reason=str(error))
            return _SessionEnd(
                welcomed=welcomed,
                reregister=error.grpc_code in _REREGISTER_CODES,
                reason=str(error),
                reconnect_after=_planned_pause(error),
                error=error,
            )
        except TimeoutError:
            return _SessionEnd(
                welcomed=welcomed, reason=f"no word from the server in {self.heartbeat_timeout}s"
            )
        finally:
            self._session = None
            self._connected.clear()
            if beats is not None:
                beats.cancel()
            call.cancel()

    async def _read(
        self, call: grpc.aio.StreamStreamCall[v1.HeartbeatRequest, v1.HeartbeatResponse]
    ) -> object:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that arrives
        # as the read completes (gh-86296), which left a stopped agent's session running.
        async with asyncio.timeout(self.heartbeat_timeout):
            return await call.read()

    async def _outgoing(self, session: _SessionState) -> AsyncIterator[v1.HeartbeatRequest]:
        """The request stream of a session: whatever is queued, until None (half-close)."""
        while True:
            message = await session.outbox.get()
            if message is None:
                return
            yield message

    def _on_welcome(self, welcome: v1.SessionWelcome, session: _SessionState) -> None:
        self.epoch = welcome.epoch
        self._apply_intervals(welcome.heartbeat_interval, welcome.heartbeat_timeout)
        if welcome.HasField("agent"):
            self.agent_id = welcome.agent.agent_id or self.agent_id
            self.draining = welcome.agent.draining
        kept = set(welcome.kept_attempt_ids)
        for attempt_id, attempt in list(self._attempts.items()):
            if attempt_id in kept:
                continue
            if not attempt.handler_running:
                # Its result is being reported: the server no longer holds the attempt because it
                # accepted that result, or because it moved the attempt; the report's answer says
                # which (logged there). Cancelling it here would lose an accepted result's ack.
                log.debug("attempt %s: result reported, awaiting the server's answer", attempt_id)
                continue
            log.info("attempt %s was moved while disconnected; stopping it", attempt_id)
            self._stop_attempt(attempt_id, "moved")
        self.sessions_opened += 1
        self._session = session
        self._connected.set()
        if self.sessions_opened == 1:
            handled = ", ".join(sorted(self._handlers)) or "no task types"
            log.info(
                "connected as %s (%s/%s), handling %s", self.agent_id, self.name, self.instance_id, handled
            )
        else:
            log.info(
                "reconnected as %s (session %d, epoch %d)", self.agent_id, self.sessions_opened, self.epoch
            )

    def _on_server_message(self, message: v1.HeartbeatResponse, session: _SessionState) -> _SessionEnd | None:
        kind = message.WhichOneof("message")
        if kind == "ack":
            self.last_ack_status = message.ack.status
        elif kind == "assignment":
            self._on_assignment(message.assignment, session)
        elif kind == "cancellation":
            self._stop_attempt(message.cancellation.attempt_id, "cancelled")
        elif kind == "drain":
            self.draining = message.drain.draining
            log.info("drain %s: %s", "started" if self.draining else "ended", message.drain.reason)
        elif kind == "reconnect":
            request = message.reconnect
            return _SessionEnd(
                welcomed=True,
                reconnect_after=request.retry_after.ToTimedelta().total_seconds(),
                redirect=request.address if request.address != self.target else "",
                reason=f"server asked to reconnect: {request.reason}",
            )
        return None

    async def _beat(self, session: _SessionState) -> None:
        sequence = 0
        while True:
            sequence += 1
            checks = await self._run_checks()
            cpu, memory = host_load()
            load = v1.Load(active_tasks=self._busy_handlers(), cpu=cpu, memory=memory)
            session.outbox.put_nowait(
                v1.HeartbeatRequest(beat=v1.SessionBeat(sequence=sequence, load=load, checks=checks))
            )
            await asyncio.sleep(self.heartbeat_interval)

    async def _run_checks(self) -> list[v1.Check]:
        results = await asyncio.gather(*(self._run_check(name, fn) for name, fn in self._checks.items()))
        return list(results)

    async def _run_check(self, name: str, function: CheckFunction) -> v1.Check:
        # A check slower than half the beat interval would delay the beat: it counts as failing.
        limit = self.heartbeat_interval / 2
        try:
            async with asyncio.timeout(limit):
                if inspect.iscoroutinefunction(function):
                    healthy = await cast(Awaitable[bool], function())
                else:
                    # A sync check may block (a ping to a database): keep it off the event loop.
                    healthy = await asyncio.to_thread(cast(Callable[[], bool], function))
        except TimeoutError:
            message = f"no answer within {limit:g}s"
            return v1.Check(name=name, status=v1.CheckStatus.CHECK_STATUS_FAILING, message=message)
        except Exception as exc:
            return v1.Check(name=name, status=v1.CheckStatus.CHECK_STATUS_FAILING, message=repr(exc))
        status = v1.CheckStatus.CHECK_STATUS_PASSING if healthy else v1.CheckStatus.CHECK_STATUS_FAILING
        return v1.Check(name=name, status=status)
