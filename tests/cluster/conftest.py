"""Fixtures of the multi-replica tests: replicas on a fresh database (`replica_processes`, from the
harness tests/cluster/replicas.py), a channel per replica (`clients`) and agent processes (`agent_groups`);
everything started here is ended here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster.replicas import replica_processes
from tests.cluster.workload import AgentGroup, Clients

__all__ = ["replica_processes"]  # the fixture, for every module here


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: several replicas as real processes on PostgreSQL (tests/cluster; run by CI)"
    )


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    made = Clients()
    yield made
    await made.close()


@pytest.fixture
def agent_groups(tmp_path: Path) -> Iterator[Callable[..., AgentGroup]]:
    """`agent_groups(target, prefix, count, *args)`: agents in one process, SIGKILLed at the end."""
    made: list[AgentGroup] = []

    def spawn(target: str, prefix: str, count: int, *args: str) -> AgentGroup:
        group = AgentGroup(tmp_path, target, prefix, count, *args)
        made.append(group)
        return group

    yield spawn
    for group in made:
        group.kill()
