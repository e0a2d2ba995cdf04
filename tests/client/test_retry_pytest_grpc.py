"""AdminClient retries against a scripted *sync* servicer hosted by pytest-grpc on a real server.

pytest-grpc's own `grpc_addr` probes a free port and binds it again later; the fixtures below
override it so the server binds port 0 itself and the channel follows it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from orchestrator_client import AdminClient, Backoff, RetryPolicy, Unavailable, v1


class FlakyRegistry(v1.RegistryServiceServicer):
    """Refuses the first `failures` GetAgent calls with UNAVAILABLE, then answers."""

    def __init__(self) -> None:
        self.failures = 0
        self.calls = 0
        self.lock = threading.Lock()

    def GetAgent(self, request: v1.GetAgentRequest, context: grpc.ServicerContext) -> v1.GetAgentResponse:
        with self.lock:
            self.calls += 1
            failing = self.calls <= self.failures
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        return v1.GetAgentResponse(agent=v1.Agent(agent_id=request.agent_id, name="scripted"))


@pytest.fixture(scope="module")
def grpc_addr() -> str:
    return "127.0.0.1:0"  # unused: the server below binds port 0 itself


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    return v1.add_RegistryServiceServicer_to_server


@pytest.fixture(scope="module")
def grpc_servicer() -> FlakyRegistry:
    return FlakyRegistry()


@pytest.fixture(scope="module")
def grpc_server(
    _grpc_server: grpc.Server, grpc_add_to_server: Any, grpc_servicer: FlakyRegistry
) -> Iterator[int]:
    grpc_add_to_server(grpc_servicer, _grpc_server)
    port = _grpc_server.add_insecure_port("127.0.0.1:0")
    _grpc_server.start()
    yield port
    _grpc_server.stop(grace=None)


def policy(draws: list[float], pauses: list[float], maximum: float) -> RetryPolicy:
    values = iter(draws)

    async def record(seconds: float) -> None:
        pauses.append(seconds)

    return RetryPolicy(
        backoff=Backoff(initial=0.5, multiplier=2.0, maximum=maximum, random=lambda: next(values)),
        sleep=record,
    )


async def test_retries_back_off_with_full_jitter_and_a_cap(
    grpc_server: int, grpc_servicer: FlakyRegistry
) -> None:
    grpc_servicer.failures, grpc_servicer.calls = 5, 0
    pauses: list[float] = []
    draws = [1.0, 0.5, 1.0, 0.25, 1.0]
    async with AdminClient(f"127.0.0.1:{grpc_server}", retry=policy(draws, pauses, maximum=3.0)) as client:
        agent = await client.get_agent("agt_1", timeout=30)
    assert agent.name == "scripted"
    assert grpc_servicer.calls == 6  # five refusals over real sockets, then the answer
    # Ceilings 0.5, 1, 2, 4 -> capped at 3, 8 -> 3; each pause is the drawn share of its ceiling.
    assert pauses == pytest.approx([0.5, 0.5, 2.0, 0.75, 3.0])


async def test_gives_up_with_the_last_error_when_the_deadline_leaves_no_room(
    grpc_server: int, grpc_servicer: FlakyRegistry
) -> None:
    grpc_servicer.failures, grpc_servicer.calls = 1000, 0
    pauses: list[float] = []
    async with AdminClient(
        f"127.0.0.1:{grpc_server}", retry=policy([1.0] * 50, pauses, maximum=3.0)
    ) as client:
        with pytest.raises(Unavailable) as raised:
            await client.get_agent("agt_1", timeout=1.0)
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert grpc_servicer.calls >= 1 and sum(pauses) < 1.0
