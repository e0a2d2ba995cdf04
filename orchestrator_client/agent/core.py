"""`Agent`: registration, the Heartbeat session, task handlers, and the graceful stop.

One `Agent` holds one session (RegistryService.Heartbeat) in a background task and survives
everything the orchestrator does to it without the caller's help (see `session.py` for the cases,
`attempts.py` for the work it holds). Given several targets (replicas), it moves to another one when
its replica asks it to, refuses it, or dies, and keeps its running attempts across the move.

See docs/SDK.md for the protocol walk-through.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from orchestrator_client import v1
from orchestrator_client.agent.attempts import (
    REPORT_RETRY_CODES,
    AsyncHandler,
    SyncHandler,
    _Attempt,
    _Handler,
    _SessionState,
)
from orchestrator_client.agent.host import default_instance_id
from orchestrator_client.agent.session import CheckFunction, _SessionKeeper
from orchestrator_client.channel import ConnectionOptions
from orchestrator_client.retry import TRANSIENT_CODES, Backoff, ReconnectPacing, Retry, Sleep
from orchestrator_client.targets import Targets

if TYPE_CHECKING:
    from orchestrator_client.v1 import RegistryServiceAsyncStub, TasksServiceAsyncStub

log = logging.getLogger("orchestrator_client.agent")

F = TypeVar("F", bound=Callable[..., Any])

# How long after the server announced a planned restart reconnect pauses stay short (seconds).
PLANNED_RESTART_WINDOW = 60.0
# The default reconnect backoff. Its cap bounds how long an agent stays away once its server is
# back after a long outage (the fleet spreads uniformly below it): 10 s keeps a restart's
# re-attach within the 10 s target of issue 14 while a dead server sees about one attempt per agent
# every 5 s.
DEFAULT_RECONNECT_BACKOFF = Backoff(initial=0.5, maximum=10.0)


class AgentStopped(Exception):
    """The agent stopped on an error no retry can fix, e.g. its registration was refused.

    The `OrchestratorError` (or OSError) that stopped it is the `__cause__`.
    """


class Agent(_SessionKeeper):
    """An orchestrator agent: register, stay connected, run task handlers, report results.

    ```
    agent = Agent("localhost:50051", name="cost-agent", type="cost", max_concurrent_tasks=4)

    @agent.task("estimate")
    async def estimate(ctx: TaskContext) -> dict[str, Any]:
        return {"usd": ctx.payload["hours"] * 0.12}

    async with agent:
        await agent.run_forever()
    ```

    `target` is one orchestrator (`"host:port"`), several replicas (a list, or the same
    comma-separated: `"a:50051,b:50051"`), or a name grpc resolves to several addresses
    (`"dns:///orchestrator.ns.svc:50051"`). `start()` (or `async with`) registers and opens the session; `stop()` is the graceful exit:
    no new work, running handlers get `shutdown_grace` seconds to finish, the rest are cancelled
    and handed back with a goodbye (the server requeues them at once).
    """

    def __init__(
        self,
        target: str | Sequence[str],
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
        self._targets = Targets(target)
        self.targets = self._targets.all
        """Every replica this agent may use."""
        self.target = self._targets.current
        """The replica it uses now."""
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
            retryable_codes=TRANSIENT_CODES,
            backoff=reconnect_backoff or DEFAULT_RECONNECT_BACKOFF,
            sleep=sleep,
        )
        self._pacing = ReconnectPacing(self._reconnect, planned_window=PLANNED_RESTART_WINDOW)
        self._report_retry = replace(self._reconnect, retryable_codes=REPORT_RETRY_CODES)
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
        self._session_task = asyncio.create_task(self._keep_session(), name=f"agent-session-{self.name}")
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
            raise TimeoutError(f"no session with {self._targets} within {connect_timeout}s")

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

    async def _keep_session(self) -> None:
        fatal = await self._maintain_session()
        if fatal is not None:
            log.error("agent %s cannot continue: %s", self.name, fatal)
            self._fatal = fatal
            self.request_stop(f"fatal: {fatal}")

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
