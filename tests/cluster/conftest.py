"""Fixtures of the multi-replica tests: a fresh database in the session's throwaway PostgreSQL per
test, replicas started on it, agent processes; everything started here is ended here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.harness import AgentGroup, Replicas
from tests.postgres_cluster import new_database


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: several replicas as real processes on PostgreSQL (tests/cluster; run by CI)"
    )


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[Callable[..., Replicas]]:
    """`replicas(count, **env)`: that many replicas (not started) on a new database."""
    url = await new_database()
    made: list[Replicas] = []

    def make(count: int = 3, **env: Any) -> Replicas:
        cluster = Replicas(tmp_path, url, count, **env)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        await cluster.close()


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
