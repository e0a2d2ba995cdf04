"""Token buckets and stream caps: RESOURCE_EXHAUSTED with a retry hint, budgets kept apart,
sessions paced rather than cut, and each limit configurable."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from orchestrator.v1 import discovery_pb2, health_pb2, health_pb2_grpc, registry_pb2
from orchestrator_server.limits import RateLimiter, StreamSlots, TokenBucket
from tests.conftest import Running, async_wait_for
from tests.security.conftest import ADMIN_KEY, API_KEYS, READER_KEY, bearer, open_stream, register
from tests.support import error_detail


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=2.0, tokens=2.0, stamp=0.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused: nothing taken
    assert bucket.take(0.5) == 0.0
    # Pacing: reserve always takes, and says how long to wait.
    assert bucket.reserve(0.5) == pytest.approx(0.5)
    assert bucket.reserve(0.5) == pytest.approx(1.0)


def test_a_long_idle_bucket_allows_only_its_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=3, clock=clock)
    assert limiter.take("a") == 0.0
    clock.now += 3600.0  # an hour idle: 36,000 tokens earned, capped at 3
    taken = 0
    while limiter.take("a") == 0.0:
        taken += 1
        assert taken <= 100, "the bucket never ran dry"
    assert taken == 3


async def test_a_long_idle_principal_gets_only_its_burst_at_once(servers: Callable[..., Any]) -> None:
    running: Running = await servers(api_keys=API_KEYS, rate_limit_api_rate=1.0, rate_limit_api_burst=2)
    health = running.stubs.health
    request = health_pb2.GetSystemHealthRequest()
    await health.GetSystemHealth(request, metadata=bearer(READER_KEY))
    # Idle long enough to earn 5 tokens at 1/s, were the bucket not capped at 2.
    await asyncio.sleep(5.0)

    async def code() -> grpc.StatusCode:
        try:
            await health.GetSystemHealth(request, metadata=bearer(READER_KEY))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    codes = await asyncio.gather(*(code() for _ in range(6)))
    allowed = codes.count(grpc.StatusCode.OK)
    # The burst of 2, plus at most one token earned while a slow machine sends the six calls.
    assert 2 <= allowed <= 3, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes


def test_rate_limiter_keys_apart_and_prunes_idle_buckets() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.take("a") == 0.0
    assert limiter.take("a") > 0.0
    assert limiter.take("b") == 0.0
    for index in range(5000):
        clock.now += 0.01  # a bucket is full again a second after its call: forgetting it changes nothing
        limiter.take(f"key-{index}")
    assert len(limiter) <= 1024
    assert limiter.take("a") == 0.0
    unlimited = RateLimiter(rate=0.0, burst=1)
    assert all(unlimited.take("x") == 0.0 for _ in range(100))


def test_stream_slots() -> None:
    slots = StreamSlots(limit=2)
    assert slots.acquire("a") and slots.acquire("a")
    assert not slots.acquire("a")
    assert slots.acquire("b")
    slots.release("a")
    assert slots.count("a") == 1 and slots.acquire("a")
    slots.release("a")
    slots.release("a")
    assert slots.count("a") == 0


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    info = error_detail(error, error_details_pb2.RetryInfo)
    return info.retry_delay.ToNanoseconds() / 1e9 if info is not None else None


async def test_api_budget_per_principal_with_retry_info(servers: Callable[..., Any]) -> None:
    running: Running = await servers(api_keys=API_KEYS, rate_limit_api_rate=0.5, rate_limit_api_burst=3)
    health = running.stubs.health
    request = health_pb2.GetSystemHealthRequest()
    for _ in range(3):
        await health.GetSystemHealth(request, metadata=bearer(READER_KEY))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.GetSystemHealth(request, metadata=bearer(READER_KEY))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit" in (raised.value.details() or "")
    delay = retry_delay(raised.value)
    assert delay is not None and 0 < delay <= 2.0
    # Another principal has its own bucket.
    await health.GetSystemHealth(request, metadata=bearer(ADMIN_KEY))


async def test_heartbeats_have_their_own_budget(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS,
        rate_limit_api_rate=0.1,
        rate_limit_api_burst=1,
        rate_limit_session_rate=0.1,
        rate_limit_session_burst=2,
    )
    registered = await register(running, "agent-a", ADMIN_KEY)
    agent_id, token = registered.agent.agent_id, registered.agent_token
    registry = running.stubs.registry
    await registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id), metadata=bearer(token))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The agent's API budget is spent; its heartbeats still go through, on their own budget.
    beat = registry_pb2.SendHeartbeatRequest(agent_id=agent_id)
    await registry.SendHeartbeat(beat, metadata=bearer(token))
    await registry.SendHeartbeat(beat, metadata=bearer(token))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await registry.SendHeartbeat(beat, metadata=bearer(token))
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay(raised.value) is not None


async def test_a_session_over_its_budget_is_paced_not_cut(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS, rate_limit_session_rate=20, rate_limit_session_burst=2
    )
    busy = await register(running, "busy", ADMIN_KEY)
    calm = await register(running, "calm", ADMIN_KEY)
    busy_session = open_stream(running, busy.agent.agent_id, busy.agent_token, bearer(busy.agent_token))
    calm_session = open_stream(running, calm.agent.agent_id, calm.agent_token)
    await busy_session.receive()
    await calm_session.receive()
    started = time.monotonic()
    beats = 41
    for sequence in range(beats):
        busy_session.send(beat=registry_pb2.SessionBeat(sequence=sequence))
    # Meanwhile the other agent is answered at once.
    calm_session.send(beat=registry_pb2.SessionBeat(sequence=1))
    assert (await calm_session.receive()).ack.sequence == 1
    calm_latency = time.monotonic() - started
    acks = [(await busy_session.receive()).ack.sequence for _ in range(beats)]
    elapsed = time.monotonic() - started
    assert acks == list(range(beats))
    # The hello and two beats fit the burst; the other 39 come at 20/s.
    assert elapsed >= 1.9
    assert calm_latency < elapsed / 2
    busy_session.close()
    calm_session.close()


async def test_streams_per_principal_are_capped(servers: Callable[..., Any]) -> None:
    running: Running = await servers(api_keys=API_KEYS, max_sessions_per_principal=2)
    discovery = running.stubs.discovery

    async def watch() -> Any:
        call = discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(), metadata=bearer(READER_KEY))
        await call.read()  # the snapshot: the stream is open
        return call

    first, second = await watch(), await watch()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await watch()
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MAX_SESSIONS_PER_PRINCIPAL" in (raised.value.details() or "")
    other = await discovery.WatchAgents(discovery_pb2.WatchAgentsRequest(), metadata=bearer(ADMIN_KEY)).read()
    assert other is not grpc.aio.EOF
    first.cancel()

    async def reopened() -> bool:
        try:
            (await watch()).cancel()
        except grpc.aio.AioRpcError:
            return False
        return True

    await async_wait_for(reopened, within=10, what="slot released when a stream ends")
    second.cancel()


async def test_message_size_limit(servers: Callable[..., Any]) -> None:
    running: Running = await servers(max_message_bytes=4096)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await running.stubs.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(name="big", instance_id="1", type="worker", version="x" * 8000)
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_anonymous_callers_are_limited_by_address(servers: Callable[..., Any]) -> None:
    running: Running = await servers(rate_limit_api_rate=0.1, rate_limit_api_burst=2)
    request = health_pb2.GetSystemHealthRequest()
    await running.stubs.health.GetSystemHealth(request)
    # A second connection from the same host shares the bucket.
    async with grpc.aio.insecure_channel(running.target) as channel:
        await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(request)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_pb2_grpc.HealthServiceStub(channel).GetSystemHealth(request)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "anonymous:127.0.0.1" in (raised.value.details() or "")
