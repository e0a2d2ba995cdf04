"""`SyncAgent`: the asyncio `Agent` for programs that are not asyncio programs.

The agent's event loop runs on a background thread; handlers are plain functions that run on a
thread pool (one thread per allowed concurrent task) and get a `SyncTaskContext`. Everything else
(registration, the session, reconnects, result reporting, graceful shutdown) is the asyncio
`Agent`'s own code, so both flavours behave the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any, TypeVar

from orchestrator_client.agent import Agent, SyncHandler

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class SyncAgent:
    """Blocking facade over `Agent`; takes the same keyword arguments.

    ```
    agent = SyncAgent("localhost:50051", name="resize-agent", type="images")

    @agent.task("resize")
    def resize(ctx: SyncTaskContext) -> dict[str, Any]:
        ...

    with agent:
        agent.run_forever()
    ```
    """

    def __init__(self, target: str | Sequence[str], **agent_options: Any) -> None:
        # Signals are handled here, on the main thread; the loop thread cannot install handlers.
        agent_options["handle_signals"] = False
        self.agent = Agent(target, **agent_options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def task(self, task_type: str) -> Callable[[F], F]:
        """Decorator: a plain function handling tasks of `task_type` (see `Agent.task`)."""

        def register(function: F) -> F:
            self.add_handler(task_type, function)
            return function

        return register

    def add_handler(self, task_type: str, function: SyncHandler) -> None:
        self.agent.add_handler(task_type, function)

    def check(self, check_name: str) -> Callable[[F], F]:
        """Decorator: a health check function returning True when healthy (see `Agent.check`)."""
        return self.agent.check(check_name)

    def start(self, connect_timeout: float | None = None) -> None:
        """Start the loop thread, register and open the session; returns once connected."""
        if self._thread is not None:
            raise RuntimeError("the agent was already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name=f"{self.agent.name}-loop", daemon=True)
        self._thread.start()
        try:
            self._call(self.agent.start(connect_timeout))
        except BaseException:
            self.stop(grace=0)
            raise

    def run_forever(self) -> None:
        """Block until the agent stops; SIGINT/SIGTERM (on the main thread) stop it gracefully."""
        if self._thread is None:
            self.start()
        closed = self._submit(self.agent.run_forever())
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            closed.result()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._join()

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop (see `Agent.stop`), then end the loop thread. Idempotent."""
        if self._loop is None or self._thread is None:
            return
        if self._loop.is_running():
            self._call(self.agent.stop(grace))
        self._join()

    def __enter__(self) -> SyncAgent:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.agent.request_stop, f"signal {signal.Signals(signum).name}")

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._submit(coroutine).result()

    def _join(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or thread is threading.current_thread():
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = None
        self._thread = None
