"""Metrics and request ids: what operators scrape and grep for."""

from __future__ import annotations

import logging

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from orchestrator.v1 import registry_pb2
from tests.conftest import Stubs, async_wait_for, open_session


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    value = REGISTRY.get_sample_value(name, labels or {})
    return value or 0.0


async def test_rpc_latency_and_codes_are_counted(stubs: Stubs) -> None:
    ok_before = sample("orchestrator_rpc_duration_seconds_count", {"method": "RegisterAgent", "code": "OK"})
    bad_before = sample(
        "orchestrator_rpc_duration_seconds_count", {"method": "GetAgent", "code": "NOT_FOUND"}
    )
    await stubs.register()
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id="agt_missing"))
    assert (
        sample("orchestrator_rpc_duration_seconds_count", {"method": "RegisterAgent", "code": "OK"})
        == ok_before + 1
    )
    assert (
        sample("orchestrator_rpc_duration_seconds_count", {"method": "GetAgent", "code": "NOT_FOUND"})
        == bad_before + 1
    )


async def test_state_gauges_and_heartbeats(stubs: Stubs) -> None:
    beats_before = sample("orchestrator_heartbeats_total", {"kind": "stream"})
    session, _ = await open_session(stubs)
    session.send(beat=registry_pb2.SessionBeat(sequence=1))
    await session.receive()
    assert sample("orchestrator_heartbeats_total", {"kind": "stream"}) == beats_before + 1
    assert sample("orchestrator_agents", {"status": "ready"}) >= 1
    text = generate_latest(REGISTRY).decode()
    assert "orchestrator_tasks_pending" in text and "orchestrator_failover_paused" in text


async def test_request_id_is_taken_from_metadata_and_logged(
    stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="orchestrator.access"):
        with pytest.raises(grpc.aio.AioRpcError):
            await stubs.registry.GetAgent(
                registry_pb2.GetAgentRequest(agent_id="agt_missing"), metadata=(("x-request-id", "req-123"),)
            )
        # The server writes its access line after the status left: the client may see it first.
        await async_wait_for(
            lambda: any(
                record.name == "orchestrator.access"
                and getattr(record, "request_id", "") == "req-123"
                and "NOT_FOUND" in record.getMessage()
                for record in caplog.records
            ),
            within=10,
            what="the access line with the caller's request id",
        )


async def test_an_unimplemented_method_is_unimplemented_not_internal(stubs: Stubs) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(stubs.channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.List(health_pb2.HealthListRequest())
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
