"""The agent side of the orchestrator: registration, the Heartbeat session, task handlers.

One `Agent` holds one session (RegistryService.Heartbeat) in a background task and survives
everything the orchestrator does to it without the caller's help:

* the stream breaks or the server goes away: reconnect with exponential backoff and full jitter,
  hello again with the attempts still held, so the server keeps them (`kept_attempt_ids`);
* the server forgot the agent or its credential (hello answered NOT_FOUND / UNAUTHENTICATED):
  register again (idempotent on name + instance) and reopen;
* the server asks to reconnect (its shutdown), or refuses the session while it drains
  (UNAVAILABLE with a retry hint): wait the hint plus jitter, then reconnect; while a planned
  restart lasts the pauses stay short instead of growing;
* another live process holds the same name + instance (IDENTITY_IN_USE): stop with AgentStopped,
  never fight over the identity;
* results of attempts that finished while the server was away are retried until they land or
  are refused (a refusal means the attempt moved on; it is dropped quietly).

See docs/SDK.md for the protocol walk-through.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import logging
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, struct_pb2

from orchestrator_client import v1
from orchestrator_client.channel import ConnectionOptions
from orchestrator_client.context import SyncTaskContext, TaskContext, TaskFailure
from orchestrator_client.errors import OrchestratorError, from_grpc_error
from orchestrator_client.retry import TRANSIENT_CODES, Backoff, Retry, Sleep

if TYPE_CHECKING:
    from orchestrator_client.v1 import RegistryServiceAsyncStub, TasksServiceAsyncStub

log = logging.getLogger("orchestrator_client.agent")

TaskResult = Mapping[str, Any] | None
AsyncHandler = Callable[[TaskContext], Awaitable[TaskResult]]
SyncHandler = Callable[[SyncTaskContext], TaskResult]
CheckFunction = Callable[[], bool | Awaitable[bool]]
F = TypeVar("F", bound=Callable[..., Any])

# The session answers these when it no longer knows the agent or its credential: register again.
_REREGISTER_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED})
# A result report answered with these will never land: the attempt was moved, cancelled or is gone.
_REPORT_REFUSED_CODES = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND})
# A report is retried on the transient codes, and on UNAUTHENTICATED: the session is renewing the
# credential (it registers again on that code), and the next attempt carries the new one.
_REPORT_RETRY_CODES = TRANSIENT_CODES | {grpc.StatusCode.UNAUTHENTICATED}

# The end-of-stream marker of `call.read()`; grpc-stubs does not declare it.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]

# The server's reason (google.rpc.ErrorInfo) when another live process holds this agent's identity.
IDENTITY_IN_USE = "IDENTITY_IN_USE"
# How long after the server announced a planned restart reconnect pauses stay short (seconds).
PLANNED_RESTART_WINDOW = 60.0

_NAME_CHARS = re.compile(r"[^a-zA-Z0-9._-]")


def default_instance_id() -> str:
    """`<hostname>-<hash of the working directory and program>`: stable across restarts of the
    same program on the same host, so a restarted agent resumes its registration (and the work
    the server kept for it) instead of registering anew.

    Two processes of one agent on one host (same program, same directory) get the same id, and the
    second is refused while the first is alive (IDENTITY_IN_USE): give each its own `instance_id`.
    """
    program = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    digest = hashlib.sha256(f"{os.getcwd()}\0{program}".encode()).hexdigest()[:8]
    return _NAME_CHARS.sub("-", f"{socket.gethostname()}-{digest}")[:128]


def _planned_pause(error: OrchestratorError) -> float | None:
    """The wait a draining server asked for (UNAVAILABLE with RetryInfo), else None."""
    return error.retry_after if error.grpc_code == grpc.StatusCode.UNAVAILABLE else None


def _host_load() -> tuple[float, float]:
    """CPU (1-minute load average per core) and memory utilisation, both 0..1, without blocking."""
    cpu = 0.0
    memory = 0.0
    with contextlib.suppress(OSError, AttributeError, ValueError):
        cpu = min(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    with contextlib.suppress(OSError, AttributeError, ValueError):
        total = os.sysconf("SC_PHYS_PAGES")
        available = os.sysconf("SC_AVPHYS_PAGES")
        if total > 0:
            memory = min(1.0, max(0.0, 1.0 - available / total))
    return cpu, memory


class AgentStopped(Exception):
    """The agent stopped on an error no retry can fix, e.g. its registration was refused.

    The `OrchestratorError` (or OSError) that stopped it is the `__cause__`.
    """


@dataclass
class _Handler:
    function: Callable[..., Any]
    is_async: bool


@dataclass
class _Attempt:
    """An attempt this agent holds: its handler is running, or its result is being reported."""

    assignment: v1.TaskAssignment
    supervisor: asyncio.Task[None] | None = None
    handler: asyncio.Future[Any] | None = None
    sync_context: SyncTaskContext | None = None
    # Why the SDK stopped the handler: "cancelled" (the task was cancelled), "moved" (the server
    # placed the attempt elsewhere), "shutdown" (handed back on a graceful stop).
    stop_reason: str | None = None

    @property
    def attempt_id(self) -> str:
        return self.assignment.attempt_id

    @property
    def task_id(self) -> str:
        return self.assignment.task.task_id

    @property
    def handler_running(self) -> bool:
        return self.handler is None or not self.handler.done()


@dataclass
class _SessionEnd:
    """How a session ended, which decides how long to wait before the next one."""

    welcomed: bool
    # Set when the server planned the break (reconnect request, drain refusal): wait this long.
    reconnect_after: float | None = None
    reregister: bool = False
    reason: str = ""
    # An error no reconnect can fix (the identity is held by another live process).
    fatal: OrchestratorError | None = None
    # The error that ended it, if one did: its RetryInfo, if any, bounds the next pause from below.
    error: OrchestratorError | None = None


@dataclass
class _SessionState:
    outbox: asyncio.Queue[v1.HeartbeatRequest | None] = field(default_factory=asyncio.Queue)


class Agent:
    """An orchestrator agent: register, stay connected, run task handlers, report results.

    ```
    agent = Agent("localhost:50051", name="cost-agent", type="cost", max_concurrent_tasks=4)

    @agent.task("estimate")
    async def estimate(ctx: TaskContext) -> dict[str, Any]:
        return {"usd": ctx.payload["hours"] * 0.12}

    async with agent:
        await agent.run_forever()
    ```

    `start()` (or `async with`) registers and opens the session; `stop()` is the graceful exit:
    no new work, running handlers get `shutdown_grace` seconds to finish, the rest are cancelled
    and handed back with a goodbye (the server requeues them at once).
    """

    def __init__(
        self,
        target: str,
        *,
        name: str,
        type: str,
        instance_id: str | None = None,
        version: str = "",
        capabilities: Iterable[str] = (),
        labels: Mapping[str, str] | None = None,
        endpoints: Iterable[v1.Endpoint] = (),
        max_concurrent_tasks: int = 1,
        api_key: str | None = None,
        connection: ConnectionOptions | None = None,
        reconnect_backoff: Backoff | None = None,
        shutdown_grace: float = 30.0,
        call_timeout: float = 10.0,
        handle_signals: bool = True,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if max_concurrent_tasks < 0:
            raise ValueError("max_concurrent_tasks must be >= 0")
        self.target = target
        self.name = name
        self.type = type
        self.instance_id = instance_id or default_instance_id()
        # Tells the server this process's sessions apart from another process's with the same
        # name + instance (SessionHello.incarnation).
        self.incarnation = secrets.token_hex(8)
        self.version = version
        self.capabilities = list(capabilities)
        self.labels = dict(labels or {})
        self.endpoints = list(endpoints)
        self.max_concurrent_tasks = max_concurrent_tasks
        self._api_key = api_key
        self._connection = connection or ConnectionOptions()
        # One policy type for both loops that outlive a server outage. The session keeper retries
        # on the transient codes for ever (an agent never gives up on its orchestrator; anything
        # else stops it); a result report also waits out a credential renewal.
        self._reconnect = Retry(
            retryable_codes=TRANSIENT_CODES, backoff=reconnect_backoff or Backoff(), sleep=sleep
        )
        self._report_retry = replace(self._reconnect, retryable_codes=_REPORT_RETRY_CODES)
        self._shutdown_grace = shutdown_grace
        self._call_timeout = call_timeout
        self._handle_signals = handle_signals

        self._handlers: dict[str, _Handler] = {}
        self._checks: dict[str, CheckFunction] = {}
        self._attempts: dict[str, _Attempt] = {}

        self._channel: grpc.aio.Channel | None = None
        self._registry: RegistryServiceAsyncStub | None = None
        self._tasks: TasksServiceAsyncStub | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

        self.agent_id: str = ""
        self._token: str | None = None
        self.heartbeat_interval: float = 10.0
        self.heartbeat_timeout: float = 60.0
        self.epoch: int = 0
        self.sessions_opened = 0
        """Welcomes received so far; above 1 means the agent reconnected."""
        self.draining = False
        self.last_ack_status: v1.AgentStatus.ValueType = v1.AgentStatus.AGENT_STATUS_UNSPECIFIED

        self._session: _SessionState | None = None
        self._connected = asyncio.Event()
        self._closed = asyncio.Event()
        self._stopping = False
        self._stop_task: asyncio.Task[None] | None = None
        self._session_task: asyncio.Task[None] | None = None
        self._fatal: BaseException | None = None
        self._background: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------------------- registration API

    def task(self, task_type: str) -> Callable[[F], F]:
        """Decorator: the function handles tasks of `task_type`.

        An `async def` handler gets a `TaskContext` and runs on the event loop; a plain `def`
        handler gets a `SyncTaskContext` and runs on a worker thread. The return value (a mapping of
        JSON values, or None) is the task's result; an exception fails the attempt.
        """

        def register(function: F) -> F:
            self.add_handler(task_type, function)
            return function

        return register

    def add_handler(self, task_type: str, function: AsyncHandler | SyncHandler) -> None:
        if task_type in self._handlers:
            raise ValueError(f"a handler for task type {task_type!r} is already registered")
        self._handlers[task_type] = _Handler(function, inspect.iscoroutinefunction(function))

    def check(self, check_name: str) -> Callable[[F], F]:
        """Decorator: a self-reported health check sent with every beat.

        The function (sync or async) returns True when healthy; False or an exception reports the
        check FAILING, which makes the orchestrator mark the agent DEGRADED.
        """

        def register(function: F) -> F:
            self._checks[check_name] = function
            return function

        return register

    # ------------------------------------------------------------------------------- lifecycle API

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def running_attempt_ids(self) -> list[str]:
        return sorted(self._attempts)

    async def start(self, connect_timeout: float | None = None) -> None:
        """Register and open the session; returns once the server welcomed the agent.

        Waits through server unavailability (the session keeps retrying in the background) unless
        `connect_timeout` is given. Raises `AgentStopped` if the agent cannot run at all (registration
        refused: invalid name, rejected API key).
        """
        if self._session_task is not None:
            raise RuntimeError("the agent was already started")
        self._loop = asyncio.get_running_loop()
        self._open_channel(self.target)
        self._session_task = asyncio.create_task(self._maintain_session(), name=f"agent-session-{self.name}")
        connected = asyncio.create_task(self._connected.wait())
        closed = asyncio.create_task(self._closed.wait())
        try:
            done, _ = await asyncio.wait(
                {connected, closed}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            connected.cancel()
            closed.cancel()
        if self._closed.is_set():
            raise AgentStopped(
                self._stopped_message("the agent stopped before it connected")
            ) from self._fatal
        if not done:
            raise TimeoutError(f"no session with {self.target} within {connect_timeout}s")

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run_forever(self) -> None:
        """Serve tasks until `stop()` is called or, with `handle_signals`, SIGINT/SIGTERM arrives.

        Raises the fatal error that stopped the agent, if one did.
        """
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        if self._handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(signum, self.request_stop, f"signal {signum.name}")
                    installed.append(signum)
        try:
            if self._session_task is None:
                # A signal while still connecting stops the agent too; a fatal error is raised below.
                with contextlib.suppress(AgentStopped):
                    await self.start()
            await self._closed.wait()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
        if self._fatal is not None:
            raise AgentStopped(self._stopped_message("the agent stopped on an error")) from self._fatal

    def _stopped_message(self, what: str) -> str:
        return f"{what}: {self._fatal}" if self._fatal is not None else what

    async def stop(self, grace: float | None = None, *, reason: str = "agent shutting down") -> None:
        """Graceful stop: finish or hand back in-flight work, say goodbye, close. Idempotent."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._shutdown(grace, reason))
        await asyncio.shield(self._stop_task)

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Begin a graceful stop without waiting for it (for signal handlers and callbacks)."""
        log.info("stopping agent %s: %s", self.name, reason)
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._shutdown(None, reason))

    # ------------------------------------------------------------------------------------ channel

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

    def _api_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._api_key}"),) if self._api_key else ()

    def _agent_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

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

    async def _maintain_session(self) -> None:
        """Keep one session open for the agent's whole life; the heart of the resilience story."""
        loop = asyncio.get_running_loop()
        failures = 0
        planned_until = 0.0  # loop time until which a planned restart keeps pauses short
        while not self._stopping:
            try:
                if self._token is None:
                    await self._register()
                end = await self._run_session()
            except grpc.RpcError as err:
                error = from_grpc_error(err)
                if not self._reconnect.retryable(error):
                    self._fail(error, err)
                    return
                end = _SessionEnd(
                    welcomed=False,
                    reason=f"registration failed: {error}",
                    reconnect_after=_planned_pause(error),
                    error=error,
                )
            except OSError as err:  # e.g. unreadable TLS files: nothing a retry can fix
                self._fail(err, err)
                return
            if end.fatal is not None:
                self._fail(end.fatal, end.fatal.__cause__ or end.fatal)
                return
            if self._stopping:
                return
            if end.welcomed:
                failures = 0
            if end.reregister:
                self._token = None
            backoff = self._reconnect.backoff
            if end.reconnect_after is not None:
                # Planned by the server (its shutdown or drain): every agent hears it at once, so
                # spread them over a window at least as long as the wait the server asked for.
                planned_until = loop.time() + PLANNED_RESTART_WINDOW
                pause = end.reconnect_after + backoff.random() * max(backoff.initial, end.reconnect_after)
            elif loop.time() < planned_until:
                # The server said it is restarting: it is away for seconds, not broken, so
                # neither grow the backoff nor count these refusals as failures.
                pause = self._reconnect.delay(0, end.error)
            else:
                pause = self._reconnect.delay(failures, end.error)
                failures += 1
            log.warning("session with %s ended (%s); reconnecting in %.2fs", self.target, end.reason, pause)
            await self._reconnect.sleep(pause)

    def _fail(self, error: BaseException, cause: BaseException) -> None:
        log.error("agent %s cannot continue: %s", self.name, error)
        if error is not cause:
            error.__cause__ = cause
        self._fatal = error
        self.request_stop(f"fatal: {error}")

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
            if request.address and request.address != self.target:
                self._open_channel(request.address)
            return _SessionEnd(
                welcomed=True,
                reconnect_after=request.retry_after.ToTimedelta().total_seconds(),
                reason=f"server asked to reconnect: {request.reason}",
            )
        return None

    async def _beat(self, session: _SessionState) -> None:
        sequence = 0
        while True:
            sequence += 1
            checks = await self._run_checks()
            cpu, memory = _host_load()
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

    def _busy_handlers(self) -> int:
        return sum(1 for attempt in self._attempts.values() if attempt.handler_running)

    # ---------------------------------------------------------------------------------- attempts

    def _send_update(self, attempt: _Attempt, kind: v1.TaskUpdateKind.ValueType, **fields: Any) -> bool:
        """Queue a task update on the open session; False when there is none."""
        session = self._session
        if session is None:
            return False
        update = v1.SessionTaskUpdate(
            task_id=attempt.task_id, attempt_id=attempt.attempt_id, kind=kind, **fields
        )
        session.outbox.put_nowait(v1.HeartbeatRequest(task_update=update))
        return True

    def _on_assignment(self, assignment: v1.TaskAssignment, session: _SessionState) -> None:
        attempt = _Attempt(assignment)
        if attempt.attempt_id in self._attempts:
            return  # delivery is at-least-once: this attempt is already ours
        task_type = assignment.task.spec.type
        refusal = None
        if self._stopping:
            refusal = "agent shutting down"
        elif task_type not in self._handlers:
            refusal = f"no handler for task type {task_type!r}"
        elif self._busy_handlers() >= self.max_concurrent_tasks:
            refusal = f"at capacity ({self.max_concurrent_tasks} tasks)"
        if refusal is not None:
            log.info("rejecting attempt %s: %s", attempt.attempt_id, refusal)
            update = v1.SessionTaskUpdate(
                task_id=attempt.task_id,
                attempt_id=attempt.attempt_id,
                kind=v1.TaskUpdateKind.TASK_UPDATE_KIND_REJECTED,
                reason=refusal,
            )
            session.outbox.put_nowait(v1.HeartbeatRequest(task_update=update))
            return
        self._attempts[attempt.attempt_id] = attempt
        attempt.supervisor = asyncio.create_task(
            self._supervise(attempt), name=f"attempt-{attempt.attempt_id}"
        )

    def _stop_attempt(self, attempt_id: str, reason: str) -> None:
        attempt = self._attempts.get(attempt_id)
        if attempt is None or attempt.stop_reason is not None:
            return
        attempt.stop_reason = reason
        if attempt.sync_context is not None:
            attempt.sync_context.cancelled.set()
        if attempt.handler is not None and not attempt.handler.done():
            attempt.handler.cancel()
        elif reason != "shutdown" and attempt.supervisor is not None:
            # The handler already finished; its report would be refused anyway.
            attempt.supervisor.cancel()

    async def _supervise(self, attempt: _Attempt) -> None:
        """Run one attempt's handler and report its outcome; the SDK's side of at-least-once."""
        try:
            if not self._send_update(attempt, v1.TaskUpdateKind.TASK_UPDATE_KIND_STARTED):
                await self._report_progress_unary(attempt, 0.0, "started")
            handler = self._handlers[attempt.assignment.task.spec.type]
            attempt.handler = self._start_handler(handler, attempt)
            try:
                outcome = await attempt.handler
            except asyncio.CancelledError:
                if not attempt.handler.cancelled():
                    raise  # this supervisor itself is being cancelled
                if attempt.stop_reason is not None:
                    log.info("attempt %s stopped (%s)", attempt.attempt_id, attempt.stop_reason)
                    return
                await self._fail_attempt(
                    attempt, "handler cancelled itself", "CANCELLED", non_retryable=False
                )
                return
            except TaskFailure as exc:
                await self._fail_attempt(attempt, exc.message, exc.reason, exc.non_retryable)
                return
            except Exception as exc:
                log.exception("handler for attempt %s failed", attempt.attempt_id)
                await self._fail_attempt(
                    attempt, str(exc) or repr(exc), type(exc).__name__, non_retryable=False
                )
                return
            if attempt.stop_reason in ("cancelled", "moved"):
                return  # the handler ignored the cancellation; its result would be refused
            await self._complete_attempt(attempt, outcome)
        finally:
            self._attempts.pop(attempt.attempt_id, None)

    def _start_handler(self, handler: _Handler, attempt: _Attempt) -> asyncio.Future[Any]:
        if handler.is_async:
            context = TaskContext(attempt.assignment, functools.partial(self._progress, attempt))
            return asyncio.ensure_future(cast(Awaitable[Any], handler.function(context)))
        loop = asyncio.get_running_loop()
        sync_context = SyncTaskContext(attempt.assignment, functools.partial(self._progress, attempt), loop)
        attempt.sync_context = sync_context
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=max(1, self.max_concurrent_tasks), thread_name_prefix=f"{self.name}-handler"
            )
        return loop.run_in_executor(self._executor, handler.function, sync_context)

    async def _progress(self, attempt: _Attempt, fraction: float, message: str) -> None:
        progress = v1.TaskProgress(fraction=fraction, message=message)
        if not self._send_update(attempt, v1.TaskUpdateKind.TASK_UPDATE_KIND_PROGRESS, progress=progress):
            await self._report_progress_unary(attempt, fraction, message)

    async def _report_progress_unary(self, attempt: _Attempt, fraction: float, message: str) -> None:
        """Progress (or STARTED) when no session is open; best effort, the result report matters."""
        assert self._tasks is not None
        request = v1.ReportTaskProgressRequest(
            task_id=attempt.task_id,
            attempt_id=attempt.attempt_id,
            progress=v1.TaskProgress(fraction=fraction, message=message),
        )
        try:
            await self._tasks.ReportTaskProgress(
                request, metadata=self._agent_metadata(), timeout=self._call_timeout
            )
        except grpc.RpcError as err:
            log.debug("progress of %s not delivered: %s", attempt.attempt_id, from_grpc_error(err))

    async def _complete_attempt(self, attempt: _Attempt, outcome: Any) -> None:
        result = struct_pb2.Struct()
        try:
            if outcome is not None:
                if not isinstance(outcome, Mapping):
                    raise TypeError(f"a handler returns a mapping or None, not {type(outcome).__name__}")
                result.update(outcome)
        except (TypeError, ValueError) as exc:
            await self._fail_attempt(attempt, f"invalid result: {exc}", "INVALID_RESULT", non_retryable=True)
            return
        request = v1.CompleteTaskRequest(
            task_id=attempt.task_id, attempt_id=attempt.attempt_id, result=result
        )
        try:
            await self._report(attempt, lambda deadline: self._complete_call(request, deadline))
        except OrchestratorError as error:
            # The server refused the result itself (too large, not valid): fail rather than hang.
            await self._fail_attempt(attempt, f"result rejected: {error.message}", "RESULT_REJECTED", True)

    async def _complete_call(self, request: v1.CompleteTaskRequest, deadline: float) -> object:
        assert self._tasks is not None
        return await self._tasks.CompleteTask(request, metadata=self._agent_metadata(), timeout=deadline)

    async def _fail_attempt(self, attempt: _Attempt, message: str, reason: str, non_retryable: bool) -> None:
        request = v1.FailTaskRequest(
            task_id=attempt.task_id,
            attempt_id=attempt.attempt_id,
            error=v1.TaskError(message=message[:4096], reason=reason, non_retryable=non_retryable),
        )

        async def call(deadline: float) -> object:
            assert self._tasks is not None
            return await self._tasks.FailTask(request, metadata=self._agent_metadata(), timeout=deadline)

        try:
            await self._report(attempt, call)
        except OrchestratorError as error:
            log.error("failure of attempt %s not accepted: %s", attempt.attempt_id, error)

    async def _report(self, attempt: _Attempt, call: Callable[[float], Awaitable[object]]) -> None:
        """Deliver a result: retried while the server is away, until it lands or is refused.

        Refusals (FAILED_PRECONDITION, NOT_FOUND) mean the attempt is no longer ours (moved, handed
        back, cancelled): dropped quietly. Other errors are raised to the caller.
        """

        def retrying(error: OrchestratorError) -> None:
            log.info("report for attempt %s failed (%s); retrying", attempt.attempt_id, error)

        async def deliver(_: float | None) -> object:
            # No deadline over the retries (the result must land); each attempt has its own.
            return await call(self._call_timeout)

        try:
            await replace(self._report_retry, on_error=retrying).run(deliver)
        except OrchestratorError as error:
            if error.grpc_code not in _REPORT_REFUSED_CODES:
                raise
            log.info("report for attempt %s refused (%s): it moved on", attempt.attempt_id, error)

    # ---------------------------------------------------------------------------------- shutdown

    async def _shutdown(self, grace: float | None, reason: str) -> None:
        self._stopping = True
        grace = self._shutdown_grace if grace is None else grace
        try:
            await self._finish_or_hand_back(grace)
            await self._say_goodbye(reason)
        finally:
            await self._close()

    async def _finish_or_hand_back(self, grace: float) -> None:
        supervisors = [a.supervisor for a in self._attempts.values() if a.supervisor is not None]
        if supervisors:
            log.info("waiting up to %.1fs for %d running attempts", grace, len(supervisors))
            await asyncio.wait(supervisors, timeout=grace)
        unfinished = [a for a in self._attempts.values() if a.supervisor is not None]
        for attempt in unfinished:
            self._stop_attempt(attempt.attempt_id, "shutdown")
        supervisors = [a.supervisor for a in unfinished if a.supervisor is not None]
        if supervisors:
            # Let cancelled handlers unwind (their finally blocks run) before the goodbye hands the
            # attempts back; a handler that ignores the cancellation is abandoned after this.
            log.info("handing back %d attempts", len(supervisors))
            _, stuck = await asyncio.wait(supervisors, timeout=min(self._call_timeout, max(grace, 1.0)))
            for supervisor in stuck:
                supervisor.cancel()

    async def _say_goodbye(self, reason: str) -> None:
        session = self._session
        if session is None or self._session_task is None:
            return
        session.outbox.put_nowait(v1.HeartbeatRequest(goodbye=v1.SessionGoodbye(reason=reason)))
        session.outbox.put_nowait(None)
        # The server ends the stream once it has the goodbye; wait for that so the goodbye is not
        # lost to a cancelled call.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._session_task), timeout=self._call_timeout)

    async def _close(self) -> None:
        tasks = [a.supervisor for a in self._attempts.values() if a.supervisor is not None]
        if self._session_task is not None:
            tasks.append(self._session_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close(None)
        if self._executor is not None:
            # Sync handlers that ignore `cancelled` keep their thread; do not block the loop on them.
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


__all__ = ["Agent", "AgentStopped", "default_instance_id"]
