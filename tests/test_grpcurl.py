"""The real grpcurl binary against the server: reflection, describe, health, one registry call."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys

import pytest

from orchestrator.v1 import registry_pb2
from tests.conftest import Running

GRPCURL = shutil.which("grpcurl", path=os.path.dirname(sys.executable))


async def grpcurl(running: Running, *args: str, data: str | None = None) -> tuple[int, str, str]:
    """Runs grpcurl without blocking the event loop that serves it; returns (exit code, out, err)."""
    if GRPCURL is None:
        pytest.fail("grpcurl not found next to the interpreter (install the dev extra)")
    command = [GRPCURL, "-plaintext", "-max-time", "20"]
    if data is not None:
        command += ["-d", data]
    command += [running.target, *args]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_list_services_via_reflection(running: Running) -> None:
    code, out, err = await grpcurl(running, "list")
    assert code == 0, err
    assert set(out.split()) >= {
        "orchestrator.v1.RegistryService",
        "orchestrator.v1.HealthService",
        "orchestrator.v1.DiscoveryService",
        "orchestrator.v1.TasksService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    code, out, err = await grpcurl(running, "list", "orchestrator.v1.DiscoveryService")
    assert code == 0, err
    assert set(out.split()) == {
        f"orchestrator.v1.DiscoveryService.{method}"
        for method in ("DiscoverAgents", "ListEndpoints", "ResolveAgent", "WatchAgents")
    }


async def test_describe_a_service_and_a_message(running: Running) -> None:
    code, out, err = await grpcurl(running, "describe", "orchestrator.v1.RegistryService")
    assert code == 0, err
    assert "orchestrator.v1.RegistryService is a service" in out
    assert "rpc RegisterAgent ( .orchestrator.v1.RegisterAgentRequest )" in out
    assert "rpc Heartbeat ( stream .orchestrator.v1.HeartbeatRequest ) returns ( stream" in out
    code, out, err = await grpcurl(running, "describe", "orchestrator.v1.RegisterAgentRequest")
    assert code == 0, err
    assert "string instance_id = 2" in out and "map<string, string> labels = 6;" in out


async def test_health_check(running: Running) -> None:
    for service in ("", "orchestrator.v1.RegistryService"):
        code, out, err = await grpcurl(
            running, "grpc.health.v1.Health/Check", data=json.dumps({"service": service})
        )
        assert code == 0, err
        assert json.loads(out) == {"status": "SERVING"}
    code, _, err = await grpcurl(running, "grpc.health.v1.Health/Check", data='{"service": "nope"}')
    assert code != 0 and "NotFound" in err


async def test_register_agent_with_json(running: Running) -> None:
    request = {
        "name": "cli-agent",
        "instance_id": "1",
        "type": "worker",
        "labels": {"zone": "a"},
        "endpoints": [{"name": "api", "address": "10.0.0.1:80", "protocol": "ENDPOINT_PROTOCOL_HTTP"}],
    }
    code, out, err = await grpcurl(
        running, "orchestrator.v1.RegistryService/RegisterAgent", data=json.dumps(request)
    )
    assert code == 0, err
    response = json.loads(out)
    # grpcurl 1.8 prints the proto field names.
    assert response["created"] is True and response["agent_token"]
    agent_id = response["agent"]["agent_id"]
    assert response["agent"]["status"] == "AGENT_STATUS_READY"
    stored = await running.stubs.registry.GetAgent(registry_pb2.GetAgentRequest(agent_id=agent_id))
    assert dict(stored.agent.labels) == {"zone": "a"}
    assert stored.agent.endpoints[0].address == "10.0.0.1:80"

    # A bad request is INVALID_ARGUMENT, with the field named, as grpcurl prints it.
    code, _, err = await grpcurl(running, "orchestrator.v1.RegistryService/RegisterAgent", data="{}")
    assert code != 0
    assert "InvalidArgument" in err and "name: is required" in err
