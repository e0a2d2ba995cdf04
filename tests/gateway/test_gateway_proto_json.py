"""The gateway's JSON writer gives exactly what json_format gives, on every kind of field."""

from __future__ import annotations

import math

import pytest
from google.protobuf import any_pb2, duration_pb2, field_mask_pb2, json_format, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from orchestrator.v1 import agent_pb2, discovery_pb2, event_pb2, health_pb2, registry_pb2, task_pb2, tasks_pb2
from orchestrator_server.gateway.proto_json import ProtoJsonWriter


def _agent() -> agent_pb2.Agent:
    agent = agent_pb2.Agent(
        agent_id="agt_1",
        name="cost",
        capabilities=["a", "b"],
        labels={"zone": "eu", "tier": "gold"},
        endpoints=[agent_pb2.Endpoint(name="api", address="h:1", protocol=agent_pb2.ENDPOINT_PROTOCOL_GRPC)],
        max_concurrent_tasks=3,
        status=agent_pb2.AGENT_STATUS_DEGRADED,
        draining=True,
        load=agent_pb2.Load(active_tasks=2, cpu=0.25, memory=1e-9),
        checks=[agent_pb2.Check(name="disk", status=agent_pb2.CHECK_STATUS_FAILING, message="full")],
        session=agent_pb2.Session(epoch=2**62, peer="ipv4:127.0.0.1:5", streaming=True),
        transitions=-3,
        revision=9_007_199_254_740_993,  # beyond a double's integer precision: must stay a string
    )
    agent.registered_at.FromNanoseconds(1_700_000_000_123_456_789)
    agent.last_heartbeat_at.FromSeconds(1_700_000_000)
    return agent


def _task() -> task_pb2.Task:
    payload = struct_pb2.Struct()
    payload.update({"n": 1.5, "list": [1, "x", None, True], "nested": {"k": "v"}})
    spec = task_pb2.TaskSpec(
        type="report",
        payload=payload,
        queue_timeout=duration_pb2.Duration(seconds=3, nanos=500),
        labels={"a": "b"},
    )
    return task_pb2.Task(
        task_id="tsk_1",
        spec=spec,
        status=task_pb2.TASK_STATUS_FAILED,
        attempts=[task_pb2.Attempt(attempt_id="att_1", number=1, error=task_pb2.TaskError(message="boom"))],
        result=payload,
        progress=task_pb2.TaskProgress(fraction=float("nan"), message="?"),
    )


def _any_detail() -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1)))
    return packed


MESSAGES: list[Message] = [
    registry_pb2.ListAgentsResponse(agents=[_agent(), agent_pb2.Agent()], next_page_token="p"),
    registry_pb2.RegisterAgentResponse(agent=_agent(), agent_token="t", created=True),
    registry_pb2.UpdateAgentRequest(
        agent_id="a", update_mask=field_mask_pb2.FieldMask(paths=["labels", "version"])
    ),
    registry_pb2.SendHeartbeatResponse(status=agent_pb2.AGENT_STATUS_READY),
    tasks_pb2.GetTaskResponse(task=_task()),
    discovery_pb2.WatchAgentsResponse(
        revision=5, delta=discovery_pb2.AgentDelta(type=event_pb2.EVENT_TYPE_AGENT_UPDATED)
    ),
    discovery_pb2.WatchAgentsResponse(revision=6, snapshot=discovery_pb2.AgentSnapshot()),
    health_pb2.GetSystemHealthResponse(
        agents_by_status=[health_pb2.StatusCount(status=agent_pb2.AGENT_STATUS_DOWN, count=4)],
        uptime=duration_pb2.Duration(seconds=-1, nanos=-5),
    ),
    agent_pb2.Load(cpu=float("inf"), memory=float("-inf")),
    agent_pb2.Agent(status=99),  # type: ignore[arg-type]  # an enum number this build does not know
    struct_pb2.Value(list_value=struct_pb2.ListValue(values=[struct_pb2.Value(null_value=0)])),
    wrappers_pb2.Int64Value(value=7),
    _any_detail(),
]


@pytest.mark.parametrize("emit_defaults", [True, False])
@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_writer_equals_json_format(message: Message, emit_defaults: bool) -> None:
    expected = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=emit_defaults
    )
    written = ProtoJsonWriter(emit_defaults).to_dict(message)
    assert _normalized(written) == _normalized(expected)


def _normalized(value: object) -> object:
    """NaN != NaN, so compare a stand-in for it."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    return value


def test_defaults_are_fresh_objects_per_answer() -> None:
    writer = ProtoJsonWriter(emit_defaults=True)
    first = writer.to_dict(agent_pb2.Agent())
    first["capabilities"].append("mutated")
    first["labels"]["x"] = "y"
    second = writer.to_dict(agent_pb2.Agent())
    assert second["capabilities"] == []
    assert second["labels"] == {}
