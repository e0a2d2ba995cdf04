"""What runs inside a load-generator process: agents with sessions, unary callers, task creators.

Times are ``time.perf_counter()`` readings, which on Linux are CLOCK_MONOTONIC and therefore
comparable between the processes of one machine (the parent stamps a SIGKILL, a worker stamps the
assignment it then receives).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf import struct_pb2

from bench import echo_server
from bench.client import Credential, Stubs, beat, channel, hello, register_request
from orchestrator.v1 import discovery_pb2, registry_pb2, task_pb2, tasks_pb2

now = time.perf_counter
# grpc.aio.EOF ends a stream's read(); grpc-stubs does not declare it.
EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
MAX_SAMPLES = 200_000  # bound on latency samples one worker keeps per measurement
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
COMPLETE_RETRY_S = 30.0  # how long an agent keeps retrying a CompleteTask no server answers


def new_session_call(stubs: Stubs) -> Any:
    """A new Heartbeat call, driven with write()/read() (grpc-stubs only type the iterator style)."""
    return stubs.registry.Heartbeat()  # type: ignore[call-arg]


class SessionFailed(Exception):
    """The session did not get a welcome."""


class AgentSession:
    """One agent's Heartbeat stream: hello -> welcome, a beat per interval, acks, pushed tasks."""

    def __init__(
        self, gen: LoadGen, cred: Credential, stubs: Stubs, interval: float, reconnect: bool
    ) -> None:
        self.gen = gen
        self.cred = cred
        self.stubs = stubs
        self.interval = interval
        self.reconnect = reconnect
        self.opened = asyncio.Event()  # set at the first welcome or the first failure
        self.failure = ""
        self.alive = False
        self.running: set[str] = set()
        self._sent: dict[int, float] = {}
        self._seq = 0
        self._lock = asyncio.Lock()
        self._stop = False
        self._call: Any = None
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        backoff = BACKOFF_BASE_S
        while not self._stop and now() < self.gen.deadline:
            retry_after: float | None = None
            try:
                retry_after = await self._one_session()
                backoff = BACKOFF_BASE_S
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                self.gen.errors[f"session {code.name}"] += 1
                self._fail(f"{code.name}: {exc.details()}")
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED) and self.reconnect:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._reregister()
            except SessionFailed as exc:
                self.gen.errors["session no welcome"] += 1
                self._fail(str(exc))
            except asyncio.InvalidStateError:
                # The server finished the call before the hello could be written (a storm).
                self.gen.errors["session finished before hello"] += 1
                self._fail("session finished before hello")
            if not self.reconnect or self._stop:
                break
            delay = retry_after if retry_after is not None else 0.0
            delay += random.uniform(0, backoff)  # full jitter
            backoff = min(backoff * 2, BACKOFF_CAP_S)
            await asyncio.sleep(delay)

    def _fail(self, reason: str) -> None:
        self.alive = False
        if not self.opened.is_set():
            self.failure = reason
            self.opened.set()

    async def _reregister(self) -> None:
        req = register_request(
            self.cred.name, self.cred.instance_id, self.gen.agent_type, self.gen.capabilities
        )
        resp = await self.stubs.registry.RegisterAgent(req, timeout=30)
        self.cred.agent_id, self.cred.token = resp.agent.agent_id, resp.agent_token

    async def _one_session(self) -> float | None:
        call = new_session_call(self.stubs)
        self._call = call
        await call.write(hello(self.cred, sorted(self.running)))
        first = await call.read()
        if first is EOF or first.WhichOneof("message") != "welcome":
            call.cancel()
            raise SessionFailed(f"first message was not a welcome: {first!r}"[:200])
        self.alive = True
        self.gen.welcomes.append((self.cred.agent_id, now()))
        self.opened.set()
        beats = asyncio.create_task(self._beat_loop(call))
        retry_after: float | None = None
        try:
            while True:
                msg = await call.read()
                if msg is EOF:
                    break
                kind = msg.WhichOneof("message")
                if kind == "ack":
                    sent = self._sent.pop(msg.ack.sequence, None)
                    if sent is not None:
                        self.gen.on_ack(now() - sent)
                elif kind == "assignment":
                    self.gen.spawn(self._on_assignment(msg.assignment))
                elif kind == "cancellation":
                    self.running.discard(msg.cancellation.attempt_id)
                elif kind == "reconnect":
                    retry_after = msg.reconnect.retry_after.ToTimedelta().total_seconds()
                    break
        finally:
            self.alive = False
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            call.cancel()
        return retry_after

    async def _write(self, req: registry_pb2.HeartbeatRequest) -> None:
        async with self._lock:
            await self._call.write(req)

    async def _beat_loop(self, call: Any) -> None:
        next_at = now() + random.uniform(0, self.interval)  # spread the beats of many sessions
        while not self._stop:
            await asyncio.sleep(max(0.0, next_at - now()))
            self._seq += 1
            if len(self._sent) > 64:  # acks that never came; do not grow without bound
                self._sent.clear()
            self._sent[self._seq] = now()
            try:
                async with self._lock:
                    await call.write(self._beat_message(self._seq))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                # The call ended under this write; the reader sees it end and reconnects.
                return
            self.gen.beats_sent += 1
            next_at += self.interval

    def _beat_message(self, sequence: int) -> Any:
        return beat(sequence)

    async def _on_assignment(self, assignment: registry_pb2.TaskAssignment) -> None:
        task = assignment.task
        key = task.spec.labels.get("bench_seq") or task.task_id
        self.gen.pushed.setdefault(key, now())
        self.gen.assignments[task.task_id] += 1
        self.gen.task_keys[task.task_id] = key
        self.running.add(assignment.attempt_id)
        self.gen.assigned_event.set()
        update = registry_pb2.HeartbeatRequest(
            task_update=registry_pb2.SessionTaskUpdate(
                task_id=task.task_id,
                attempt_id=assignment.attempt_id,
                kind=registry_pb2.TASK_UPDATE_KIND_STARTED,
            )
        )
        try:
            await self._write(update)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            # The stream ended under the write (its server died): the agent still holds the
            # attempt (its next hello lists it) and finishes it, as a real agent would.
            self.gen.errors["task_update write"] += 1
        if self.gen.task_mode == "hold":
            return
        if self.gen.task_work_s:
            await asyncio.sleep(self.gen.task_work_s)
        req = tasks_pb2.CompleteTaskRequest(
            task_id=task.task_id,
            attempt_id=assignment.attempt_id,
            result=struct_pb2.Struct(fields={"ok": struct_pb2.Value(bool_value=True)}),
        )
        try:
            await self._complete(req)
        except grpc.aio.AioRpcError as exc:
            self.gen.errors[f"CompleteTask {exc.code().name}"] += 1
            return
        finally:
            self.running.discard(assignment.attempt_id)
        self.gen.done.setdefault(key, now())
        self.gen.completed[task.task_id] += 1

    async def _complete(self, req: tasks_pb2.CompleteTaskRequest) -> None:
        """CompleteTask, retried while no server answers (its replica died: the channel moves on to
        the next address), as an agent keeps a finished result until it is taken."""
        deadline = now() + COMPLETE_RETRY_S
        while True:
            try:
                await self.stubs.tasks.CompleteTask(req, metadata=self.cred.metadata(), timeout=30)
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or now() > deadline:
                    raise
                self.gen.errors["CompleteTask UNAVAILABLE (retried)"] += 1
                await asyncio.sleep(BACKOFF_BASE_S)

    async def close(self, goodbye: bool) -> None:
        self._stop = True
        if goodbye and self.alive and self._call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._write(
                        registry_pb2.HeartbeatRequest(
                            goodbye=registry_pb2.SessionGoodbye(reason="bench done")
                        )
                    ),
                    2,
                )
                await asyncio.wait_for(self._call.done_writing(), 2)
        if self._call is not None:
            self._call.cancel()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class EchoSession(AgentSession):
    """The same session against the echo service (baseline): hello and beats come back as raw bytes."""

    channel: grpc.aio.Channel

    def _beat_message(self, sequence: int) -> Any:
        return beat(sequence).SerializeToString()

    async def _one_session(self) -> float | None:
        call = self.channel.stream_stream(echo_server.BIDI)()  # type: ignore[call-arg]
        self._call = call
        await call.write(hello(self.cred).SerializeToString())
        if await call.read() is EOF:
            raise SessionFailed("echo stream ended before the first answer")
        self.alive = True
        self.opened.set()
        beats = asyncio.create_task(self._beat_loop(call))
        try:
            while True:
                msg = await call.read()
                if msg is EOF:
                    break
                sent = self._sent.pop(
                    registry_pb2.HeartbeatRequest.FromString(cast(bytes, msg)).beat.sequence, None
                )
                if sent is not None:
                    self.gen.on_ack(now() - sent)
        finally:
            self.alive = False
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            call.cancel()
        return None


class LoadGen:
    """State of one worker process; ``handle(op, args)`` runs one command of the parent."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name: str = spec["name"]
        self.target: str = spec.get("target", "")
        self.echo_target: str = spec.get("echo_target", "")
        self.streams_per_channel: int = int(spec.get("streams_per_channel", 200))
        self.deadline = now() + float(spec["max_lifetime"])
        self.agent_type = "bench"
        self.capabilities: list[str] = ["cpu"]
        self.task_mode = "complete"
        self.task_work_s = 0.0  # how long an agent works on a task before completing it
        self._channels: dict[tuple[str, int], grpc.aio.Channel] = {}
        self.creds: list[Credential] = []
        self.sessions: list[AgentSession] = []
        self.recording = False
        self.ack_latencies: list[float] = []
        self.beats_sent = 0
        self.errors: Counter[str] = Counter()
        self.welcomes: list[tuple[str, float]] = []
        self.pushed: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.assignments: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.task_keys: dict[str, str] = {}
        self.assigned_event = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    # -------------------------------------------------------------------------------- plumbing
    def chan(self, index: int = 0, target: str | None = None) -> grpc.aio.Channel:
        key = (target or self.target, index)
        if key not in self._channels:
            self._channels[key] = channel(key[0])
        return self._channels[key]

    def stubs(self, index: int = 0) -> Stubs:
        return Stubs.of(self.chan(index))

    def spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def on_ack(self, seconds: float) -> None:
        if self.recording and len(self.ack_latencies) < MAX_SAMPLES:
            self.ack_latencies.append(seconds * 1000)

    async def handle(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        method: Callable[..., Awaitable[dict[str, Any]]] | None = getattr(self, f"op_{op}", None)
        if method is None:
            raise ValueError(f"unknown op {op}")
        return await method(**args)

    async def close(self) -> None:
        await asyncio.gather(*(s.close(goodbye=False) for s in self.sessions), return_exceptions=True)
        self.sessions.clear()
        for task in list(self._background):
            task.cancel()
        for ch in self._channels.values():
            with contextlib.suppress(Exception):
                await ch.close(None)
        self._channels.clear()

    # ------------------------------------------------------------------------------------- ops
    async def op_ping(self) -> dict[str, Any]:
        return {"pid": __import__("os").getpid()}

    async def op_register(
        self,
        count: int,
        prefix: str,
        agent_type: str = "bench",
        capabilities: list[str] | None = None,
        max_tasks: int = 0,
        concurrency: int = 32,
        return_creds: bool = False,
    ) -> dict[str, Any]:
        """Register ``count`` agents (idempotent on name+instance) and keep their credentials."""
        self.agent_type, self.capabilities = agent_type, capabilities or ["cpu"]
        sem = asyncio.Semaphore(concurrency)
        stubs = self.stubs(0)
        new: list[Credential] = []
        latencies: list[float] = []

        async def one(i: int) -> None:
            name, instance = prefix, f"{prefix}-{self.name}-{i}"
            req = register_request(name, instance, agent_type, self.capabilities, max_tasks)
            async with sem:
                t0 = now()
                try:
                    resp = await stubs.registry.RegisterAgent(req, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    self.errors[f"RegisterAgent {exc.code().name}"] += 1
                    return
                latencies.append((now() - t0) * 1000)
            new.append(Credential(resp.agent.agent_id, resp.agent_token, name, instance))

        t0 = now()
        await asyncio.gather(*(one(i) for i in range(count)))
        self.creds.extend(new)
        out: dict[str, Any] = {
            "registered": len(new),
            "seconds": now() - t0,
            "latencies_ms": latencies,
            "errors": dict(self.errors),
        }
        if return_creds:
            out["creds"] = [(c.agent_id, c.token) for c in new]
        return out

    async def op_open_sessions(
        self,
        interval: float = 1.0,
        open_concurrency: int = 100,
        reconnect: bool = False,
        task_mode: str = "complete",
        within: float = 120.0,
        task_work_s: float = 0.0,
    ) -> dict[str, Any]:
        """Open a session for every registered agent that has none; return once each got a welcome."""
        self.task_mode, self.task_work_s = task_mode, task_work_s
        sem = asyncio.Semaphore(open_concurrency)
        start = len(self.sessions)
        pending = self.creds[start:]

        async def open_one(i: int, cred: Credential) -> AgentSession:
            index = (start + i) // self.streams_per_channel
            session = AgentSession(self, cred, self.stubs(index), interval, reconnect)
            async with sem:
                session.start()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.opened.wait(), within)
            return session

        t0 = now()
        opened = await asyncio.gather(*(open_one(i, c) for i, c in enumerate(pending)))
        self.sessions.extend(opened)
        failures = Counter(s.failure.split(":")[0] for s in opened if s.failure or not s.opened.is_set())
        return {
            "opened": sum(1 for s in opened if s.alive),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "seconds": now() - t0,
        }

    async def op_open_echo_sessions(
        self, count: int, interval: float = 1.0, open_concurrency: int = 100, within: float = 120.0
    ) -> dict[str, Any]:
        """Baseline: ``count`` more beat/ack streams on the echo service, paced like agent sessions."""
        sem = asyncio.Semaphore(open_concurrency)
        start = len(self.sessions)

        async def open_one(i: int) -> AgentSession:
            cred = Credential(f"echo-{self.name}-{i}", "token", "echo", str(i))
            session = EchoSession(self, cred, self.stubs(0), interval, reconnect=False)
            session.channel = self.chan(i // self.streams_per_channel, self.echo_target)
            async with sem:
                session.start()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.opened.wait(), within)
            return session

        t0 = now()
        opened = await asyncio.gather(*(open_one(i) for i in range(start, start + count)))
        self.sessions.extend(opened)
        return {"opened": sum(1 for s in opened if s.alive), "seconds": now() - t0}

    async def op_measure(self, seconds: float) -> dict[str, Any]:
        """Record ack latencies for ``seconds`` (the measurement window itself)."""
        self.ack_latencies = []
        beats0, errors0 = self.beats_sent, sum(self.errors.values())
        self.recording = True
        await asyncio.sleep(seconds)
        self.recording = False
        return {
            "latencies_ms": self.ack_latencies,
            "beats": self.beats_sent - beats0,
            "errors": sum(self.errors.values()) - errors0,
            "error_kinds": dict(self.errors),
            "alive": sum(1 for s in self.sessions if s.alive),
        }

    async def op_close_sessions(self, goodbye: bool = True) -> dict[str, Any]:
        await asyncio.gather(*(s.close(goodbye) for s in self.sessions), return_exceptions=True)
        closed = len(self.sessions)
        self.sessions.clear()
        self.creds.clear()
        return {"closed": closed}

    async def op_pingpong(
        self, kind: str, streams: int, seconds: float, prefix: str = "pp"
    ) -> dict[str, Any]:
        """``streams`` bidi streams each doing beat -> ack as fast as it can, for ``seconds``."""
        calls: list[Any] = []
        if kind == "echo":
            payload = beat(123456).SerializeToString()
            for i in range(streams):
                ch = self.chan(i // self.streams_per_channel, self.echo_target)
                calls.append(ch.stream_stream(echo_server.BIDI)())  # type: ignore[call-arg]
        else:
            if len(self.creds) < streams:
                await self.op_register(streams - len(self.creds), prefix)
            for i, cred in enumerate(self.creds[:streams]):
                call = new_session_call(self.stubs(i // self.streams_per_channel))
                await call.write(hello(cred))
                first = await call.read()
                if first is EOF or first.WhichOneof("message") != "welcome":
                    raise SessionFailed(f"no welcome: {first!r}"[:200])
                calls.append(call)
        counts = [0] * len(calls)
        samples: list[float] = []
        end = now() + seconds

        async def loop(i: int, call: Any) -> None:
            seq = 0
            while True:
                t0 = now()
                if t0 >= end:
                    break
                seq += 1
                await call.write(payload if kind == "echo" else beat(seq))
                msg = await call.read()
                if msg is EOF:
                    raise SessionFailed("stream ended during ping-pong")
                counts[i] += 1
                if seq % 16 == 0 and len(samples) < MAX_SAMPLES:
                    samples.append((now() - t0) * 1000)

        t0 = now()
        await asyncio.gather(*(loop(i, c) for i, c in enumerate(calls)))
        elapsed = now() - t0
        for call in calls:
            call.cancel()
        return {"round_trips": sum(counts), "seconds": elapsed, "latencies_ms": samples}

    def _unary(self, method: str, args: dict[str, Any]) -> Callable[[int], Awaitable[Any]]:
        """A coroutine factory issuing one call of ``method`` (the argument makes requests distinct)."""
        if method == "echo":
            call = self.chan(0, self.echo_target).unary_unary(echo_server.UNARY)  # type: ignore[call-arg]
            payload = b"q" * int(args.get("request_bytes", 48))
            return lambda i: call(payload, timeout=30)
        stubs = self.stubs(0)
        if method == "register":
            prefix = f"{args.get('prefix', 'reg')}-{self.name}"
            return lambda i: stubs.registry.RegisterAgent(
                register_request("bench-register", f"{prefix}-{i}", "bench-register"), timeout=30
            )
        if method == "get":
            get_req = registry_pb2.GetAgentRequest(agent_id=args["agent_id"])
            return lambda i: stubs.registry.GetAgent(get_req, timeout=30)
        if method == "discover":
            disc_req = discovery_pb2.DiscoverAgentsRequest(
                query=discovery_pb2.AgentQuery(type=args["agent_type"])
            )
            return lambda i: stubs.discovery.DiscoverAgents(disc_req, timeout=30)
        if method == "create_task":
            prefix = f"{args.get('prefix', 'ct')}-{self.name}"
            return lambda i: stubs.tasks.CreateTask(self._task_request(args, f"{prefix}-{i}"), timeout=30)
        raise ValueError(f"unknown unary method {method}")

    @staticmethod
    def _task_request(args: dict[str, Any], key: str) -> tasks_pb2.CreateTaskRequest:
        payload = struct_pb2.Struct()
        payload.update({"job": "bench", "size": 3})
        return tasks_pb2.CreateTaskRequest(
            spec=task_pb2.TaskSpec(
                type=args.get("task_type", "bench"),
                payload=payload,
                required_capabilities=args.get("capabilities", []),
                max_attempts=int(args.get("max_attempts", 0)),
                labels={"bench_seq": key},
            )
        )

    async def op_unary_seq(self, method: str, count: int, warmup: int = 20, **args: Any) -> dict[str, Any]:
        """``count`` sequential calls (one in flight): the latency of one call."""
        issue = self._unary(method, args)
        for i in range(warmup):
            await issue(-1 - i)
        latencies = []
        for i in range(count):
            t0 = now()
            await issue(i)
            latencies.append((now() - t0) * 1000)
        return {"latencies_ms": latencies}

    async def op_unary_closed(
        self, method: str, concurrency: int, seconds: float, count: int = 10**9, **args: Any
    ) -> dict[str, Any]:
        """``concurrency`` callers in a closed loop for ``seconds`` or ``count`` calls: calls/s."""
        issue = self._unary(method, args)
        end = now() + seconds
        counter = iter(range(count))
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        sent: dict[str, float] = {}

        async def caller() -> None:
            while now() < end:
                i = next(counter, None)
                if i is None:
                    break
                t0 = now()
                if method == "create_task":
                    sent[f"{args.get('prefix', 'ct')}-{self.name}-{i}"] = t0
                try:
                    await issue(i)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    continue
                if len(latencies) < MAX_SAMPLES:
                    latencies.append((now() - t0) * 1000)

        t0 = now()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return {
            "calls": len(latencies),
            "seconds": now() - t0,
            "latencies_ms": latencies,
            "errors": dict(errors),
            "sent": sent,
        }

    async def op_create_at_rate(
        self, rate: float, count: int, max_in_flight: int = 500, **args: Any
    ) -> dict[str, Any]:
        """Open loop: ``count`` CreateTask calls issued at ``rate``/s whatever the answers take."""
        issue = self._unary("create_task", args)
        sem = asyncio.Semaphore(max_in_flight)
        sent: dict[str, float] = {}
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        prefix = f"{args.get('prefix', 'ct')}-{self.name}"

        async def one(i: int) -> None:
            async with sem:
                t0 = now()
                sent[f"{prefix}-{i}"] = t0
                try:
                    await issue(i)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    return
                latencies.append((now() - t0) * 1000)

        start = now()
        tasks = []
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - now()))  # pacing of an open-loop generator
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return {"sent": sent, "latencies_ms": latencies, "errors": dict(errors), "seconds": now() - start}

    async def op_wait_assignments(self, count: int, within: float) -> dict[str, Any]:
        """Wait until this worker's agents got ``count`` distinct tasks (and completed them if they do)."""
        deadline = now() + within
        while now() < deadline:
            got = len(self.pushed) if self.task_mode == "hold" else len(self.done)
            if got >= count:
                break
            self.assigned_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.assigned_event.wait(), min(0.05, max(0.0, deadline - now())))
        return await self.op_task_report(clear=False)

    async def op_task_report(self, clear: bool = True) -> dict[str, Any]:
        out = {
            "pushed": dict(self.pushed),
            "done": dict(self.done),
            "assignments": dict(self.assignments),
            "completed": dict(self.completed),
            "task_keys": dict(self.task_keys),
            "errors": dict(self.errors),
        }
        if clear:
            self.pushed.clear()
            self.done.clear()
            self.assignments.clear()
            self.completed.clear()
            self.task_keys.clear()
        return out

    async def op_wait_welcomes(self, since: float, within: float) -> dict[str, Any]:
        """Wait until every session of this worker got a welcome after ``since``, then report them."""
        deadline = now() + within
        while now() < deadline:
            if len({a for a, t in self.welcomes if t >= since}) >= len(self.sessions):
                break
            await asyncio.sleep(0.02)  # bounded poll of local state
        return await self.op_welcomes(since)

    async def op_welcomes(self, since: float) -> dict[str, Any]:
        """Agents whose first welcome after ``since`` (re-attached after a restart), by agent id."""
        latest: dict[str, float] = {}
        for agent_id, t in self.welcomes:
            if t >= since:
                latest.setdefault(agent_id, t)
        return {
            "welcomes": latest,
            "alive": sum(1 for s in self.sessions if s.alive),
            "sessions": len(self.sessions),
            "errors": dict(self.errors),
        }
