"""The agent index: queries walk the postings of type, capability and status (issue 14: a Discover
walked every agent), and answer exactly what a walk over every agent answers, page by page."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest

from orchestrator.v1 import agent_pb2
from orchestrator_server.agents import DEGRADED, DEREGISTERED, DOWN, DRAINING, READY, AgentFilter
from orchestrator_server.agents.index import AgentIndex
from orchestrator_server.selectors import parse_selector

STATUSES = (READY, DEGRADED, DRAINING, DOWN, DEREGISTERED)
TYPES = ("worker", "cache", "gpu-box")
CAPABILITIES = ("cpu", "gpu", "ssd", "net")


def agent(number: int, rng: random.Random, revision: int = 1) -> agent_pb2.Agent:
    return agent_pb2.Agent(
        agent_id=f"agt_{number:08d}",
        name=f"a{number}",
        instance_id="1",
        type=rng.choice(TYPES),
        status=rng.choice(STATUSES),
        capabilities=sorted(rng.sample(CAPABILITIES, rng.randint(0, 3))),
        labels={"zone": rng.choice("abc")},
        revision=revision,
    )


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the agents a query looked at (every call of `AgentFilter.matches`)."""
    seen: list[str] = []
    matches = AgentFilter.matches

    def counting(self: AgentFilter, candidate: agent_pb2.Agent) -> bool:
        seen.append(candidate.agent_id)
        return matches(self, candidate)

    monkeypatch.setattr(AgentFilter, "matches", counting)
    return seen


def test_a_discover_looks_only_at_the_ready_agents_of_its_type(counted: list[str]) -> None:
    index = AgentIndex()
    # 2,000 agents that cannot match: ready ones of another type, and down ones of the type.
    for number in range(1000):
        index.add(agent_pb2.Agent(agent_id=f"agt_a{number:06d}", type="other", status=READY))
        index.add(agent_pb2.Agent(agent_id=f"agt_b{number:06d}", type="wanted", status=DOWN))
    wanted = [f"agt_c{number:06d}" for number in range(5)]
    for agent_id in wanted:
        index.add(agent_pb2.Agent(agent_id=agent_id, type="wanted", status=READY))
    query = AgentFilter(type="wanted", statuses=frozenset({READY}))

    found = [found.agent_id for found in index.matching(query)]

    assert found == wanted
    # The ready set (1,005) or the type's agents (1,005): either way not all 2,005. Once an agent
    # comes up among the type's, the index keeps both sets as the status changes.
    assert len(counted) <= 1005
    counted.clear()
    for number in range(1000):
        down = index.get(f"agt_a{number:06d}")
        assert down is not None
        index.project(
            down, agent_pb2.Agent(agent_id=down.agent.agent_id, type="other", status=DOWN, revision=2)
        )
    assert [found.agent_id for found in index.matching(query)] == wanted
    assert len(counted) == len(wanted)


def test_a_list_of_one_capability_looks_only_at_its_agents(counted: list[str]) -> None:
    index = AgentIndex()
    for number in range(500):
        index.add(agent_pb2.Agent(agent_id=f"agt_{number:06d}", type="worker", status=READY))
    index.add(agent_pb2.Agent(agent_id="agt_zz", type="worker", status=READY, capabilities=["gpu"]))

    assert [found.agent_id for found in index.matching(AgentFilter(capabilities=("gpu",)))] == ["agt_zz"]
    assert counted == ["agt_zz"]


def pages(index: AgentIndex, query: AgentFilter, size: int) -> Iterator[list[str]]:
    token = ""
    while True:
        page, token = index.page(query, size, token)
        yield [found.agent_id for found in page]
        if not token:
            return


def every_agent_filtered(index: AgentIndex, query: AgentFilter) -> list[str]:
    return [found.agent_id for found in index.agents_after() if AgentFilter.matches(query, found)]


def random_filter(rng: random.Random) -> AgentFilter:
    query = AgentFilter(
        type=rng.choice(("", *TYPES)),
        status=rng.choice((0, 0, *STATUSES)),
        capabilities=tuple(rng.sample(CAPABILITIES, rng.randint(0, 2))),
        selector=parse_selector(rng.choice(("", "zone=a", "zone in (b,c)"))),
        include_deregistered=rng.random() < 0.2,
    )
    if rng.random() < 0.4:
        query = dataclasses.replace(query, statuses=frozenset(rng.sample(STATUSES, rng.randint(1, 2))))
    return query


def test_queries_answer_what_a_walk_over_every_agent_answers_as_agents_change() -> None:
    rng = random.Random(14)
    index = AgentIndex()
    revisions: dict[str, int] = {}
    for step in range(600):
        number = rng.randrange(150)
        agent_id = f"agt_{number:08d}"
        state = index.get(agent_id)
        if state is None:
            index.add(agent(number, rng))
            revisions[agent_id] = 1
        else:
            # A committed change of status, capabilities or labels (type stays: it is not updatable).
            revisions[agent_id] += 1
            changed = agent(number, rng, revisions[agent_id])
            changed.type = state.agent.type
            index.project(state, changed)
        if step % 20 == 0:
            for _ in range(10):
                query = random_filter(rng)
                size = rng.randint(1, 40)
                walked = [agent_id for page in pages(index, query, size) for agent_id in page]
                assert walked == every_agent_filtered(index, query), query


def test_pages_stay_stable_while_agents_leave_and_join_the_ready_set() -> None:
    """A page token is a position (an id), so agents that change status between pages move no one
    else: each agent that stays READY is listed exactly once, in registration order."""
    index = AgentIndex()
    for number in range(60):
        index.add(agent_pb2.Agent(agent_id=f"agt_{number:04d}", type="w", status=READY, revision=1))
    query = AgentFilter(statuses=frozenset({READY}))
    seen: list[str] = []
    token = ""
    flips = iter(range(0, 60, 7))
    while True:
        page, token = index.page(query, 10, token)
        seen.extend(found.agent_id for found in page)
        flip = next(flips, None)
        if flip is not None:  # an agent goes DOWN, wherever it is
            state = index.get(f"agt_{flip:04d}")
            assert state is not None
            index.project(
                state, agent_pb2.Agent(agent_id=state.agent.agent_id, type="w", status=DOWN, revision=2)
            )
        if not token:
            break
    assert seen == sorted(set(seen))
    stayed = {f"agt_{number:04d}" for number in range(60)} - {f"agt_{n:04d}" for n in range(0, 60, 7)}
    assert stayed <= set(seen)
