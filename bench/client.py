"""Client-side building blocks for the product: channels, stubs, representative messages."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import timestamp_pb2

from orchestrator.v1 import (
    agent_pb2,
    discovery_pb2_grpc,
    health_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    tasks_pb2_grpc,
)

# Separate TCP connection per channel (grpc shares subchannels between equal channels by default),
# generous message sizes for snapshots of 10k agents.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.enable_retries", 0),
]


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


@dataclass
class Stubs:
    registry: registry_pb2_grpc.RegistryServiceAsyncStub
    health: health_pb2_grpc.HealthServiceAsyncStub
    discovery: discovery_pb2_grpc.DiscoveryServiceAsyncStub
    tasks: tasks_pb2_grpc.TasksServiceAsyncStub

    @staticmethod
    def of(ch: grpc.aio.Channel) -> Stubs:
        return Stubs(
            registry_pb2_grpc.RegistryServiceStub(ch),
            health_pb2_grpc.HealthServiceStub(ch),
            discovery_pb2_grpc.DiscoveryServiceStub(ch),
            tasks_pb2_grpc.TasksServiceStub(ch),
        )


@dataclass
class Credential:
    agent_id: str
    token: str
    name: str
    instance_id: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


def register_request(
    name: str,
    instance_id: str,
    agent_type: str,
    capabilities: list[str] | None = None,
    max_tasks: int = 0,
    labels: dict[str, str] | None = None,
) -> registry_pb2.RegisterAgentRequest:
    """A registration like a real agent's: version, capabilities, labels, one endpoint."""
    return registry_pb2.RegisterAgentRequest(
        name=name,
        instance_id=instance_id,
        type=agent_type,
        version="1.4.2",
        capabilities=capabilities or ["cpu"],
        labels=labels or {"region": "eu", "tier": "gold"},
        endpoints=[
            agent_pb2.Endpoint(
                name="api", address="127.0.0.1:9000", protocol=agent_pb2.ENDPOINT_PROTOCOL_GRPC
            )
        ],
        max_concurrent_tasks=max_tasks,
    )


LOAD = agent_pb2.Load(active_tasks=1, cpu=0.25, memory=0.5)


def beat(sequence: int) -> registry_pb2.HeartbeatRequest:
    return registry_pb2.HeartbeatRequest(beat=registry_pb2.SessionBeat(sequence=sequence, load=LOAD))


def hello(cred: Credential, running: list[str] | None = None) -> registry_pb2.HeartbeatRequest:
    return registry_pb2.HeartbeatRequest(
        hello=registry_pb2.SessionHello(
            agent_id=cred.agent_id, agent_token=cred.token, running_attempt_ids=running or []
        )
    )


def message_sizes() -> dict[str, int]:
    """Serialized sizes of representative product messages; the echo baseline uses the same sizes."""
    req = register_request("cost-agent", "cost-agent-7f9c2", "cost", ["cpu", "pricing"], 8)
    ts = timestamp_pb2.Timestamp(seconds=1_790_000_000, nanos=123_456_789)
    agent = agent_pb2.Agent(
        agent_id="0f8e2b7c-3d5a-4e61-9b0a-6c2d8f1e4a37",
        name=req.name,
        instance_id=req.instance_id,
        type=req.type,
        version=req.version,
        capabilities=req.capabilities,
        labels=req.labels,
        endpoints=req.endpoints,
        max_concurrent_tasks=8,
        status=agent_pb2.AGENT_STATUS_READY,
        status_reason="session open",
        load=LOAD,
        session=agent_pb2.Session(
            epoch=3, connected_at=ts, peer="ipv4:127.0.0.1:53412", owner="orch-1", streaming=True
        ),
        registered_at=ts,
        updated_at=ts,
        last_heartbeat_at=ts,
        status_changed_at=ts,
        transitions=2,
        revision=1234,
    )
    ack = registry_pb2.HeartbeatResponse(
        ack=registry_pb2.SessionAck(sequence=123456, server_time=ts, status=agent_pb2.AGENT_STATUS_READY)
    )
    return {
        "unary_request": registry_pb2.GetAgentRequest(agent_id=agent.agent_id).ByteSize(),
        "unary_response": registry_pb2.GetAgentResponse(agent=agent).ByteSize(),
        "beat": beat(123456).ByteSize(),
        "ack": ack.ByteSize(),
    }
