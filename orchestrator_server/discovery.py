"""Discovery: which ready agents match a query, their endpoints, and picking one by strategy."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator, Sequence

from orchestrator.v1 import agent_pb2, discovery_pb2
from orchestrator_server.agents import DEGRADED, READY, AgentFilter, Registry, build_filter, take_page
from orchestrator_server.errors import FailedPrecondition
from orchestrator_server.validation import Violations, decode_page_token, encode_page_token

Strategy = discovery_pb2.LoadBalancingStrategy

#: The statuses an agent can be routed to in, without and with `include_degraded`.
_ROUTABLE = frozenset({READY})
_ROUTABLE_OR_DEGRADED = frozenset({READY, DEGRADED})


def load_score(agent: agent_pb2.Agent) -> tuple[float, float, str]:
    """Lower is less loaded: share of capacity in use, then reported CPU, then id for stability."""
    capacity = max(agent.max_concurrent_tasks, 1)
    return (agent.assigned_tasks / capacity, agent.load.cpu, agent.agent_id)


def rendezvous_pick(key: str, candidates: Sequence[agent_pb2.Agent]) -> agent_pb2.Agent:
    """Highest-random-weight hashing: a key keeps its agent while that agent stays a candidate,
    and only the keys of a departed agent move."""

    def weight(agent: agent_pb2.Agent) -> bytes:
        return hashlib.blake2b(f"{key}\x00{agent.agent_id}".encode(), digest_size=8).digest()

    return max(candidates, key=weight)


class Discovery:
    def __init__(self, registry: Registry, rng: random.Random | None = None) -> None:
        self._registry = registry
        self._rng = rng or random.Random()
        self._round_robin: dict[tuple[object, ...], int] = {}

    @staticmethod
    def query_filter(
        query: discovery_pb2.AgentQuery, violations: Violations, prefix: str = "query."
    ) -> AgentFilter:
        violations.name(f"{prefix}type", query.type, required=False)
        violations.names(f"{prefix}capabilities", query.capabilities, 64)
        return build_filter(
            violations,
            type=query.type,
            capabilities=query.capabilities,
            label_selector=query.label_selector,
            selector_field=f"{prefix}label_selector",
        )

    def candidates(
        self, query: discovery_pb2.AgentQuery, agent_filter: AgentFilter, after: str = ""
    ) -> Iterator[agent_pb2.Agent]:
        """Matching agents that can be routed to, in registration order, after the id `after`:
        the index walks the ready (and degraded) agents or those of the query's type or capability,
        whichever are fewer, never every agent."""
        allowed = _ROUTABLE_OR_DEGRADED if query.include_degraded else _ROUTABLE
        return self._registry.matching(dataclasses.replace(agent_filter, statuses=allowed), after)

    def encoded(self, agent: agent_pb2.Agent) -> bytes:
        return self._registry.encoded(agent)

    def discover(
        self, query: discovery_pb2.AgentQuery, page_size: int, page_token: str
    ) -> tuple[list[agent_pb2.Agent], str]:
        violations = Violations()
        agent_filter = self.query_filter(query, violations)
        size = violations.page_size("page_size", page_size)
        violations.raise_if_any()
        return take_page(self.candidates(query, agent_filter, decode_page_token(page_token)), size)

    def endpoints(
        self, request: discovery_pb2.ListEndpointsRequest
    ) -> tuple[list[discovery_pb2.AgentEndpoint], str]:
        violations = Violations()
        agent_filter = self.query_filter(request.query, violations)
        size = violations.page_size("page_size", request.page_size)
        if request.protocol not in agent_pb2.EndpointProtocol.values():
            violations.add("protocol", "unknown protocol")
        violations.raise_if_any()
        after = decode_page_token(request.page_token)
        # A position is the agent id and the endpoint's index: endpoints keep their declared order
        # (not name order) and names may repeat, so names cannot serve as positions.
        found: list[tuple[str, discovery_pb2.AgentEndpoint]] = []
        for agent in self.candidates(request.query, agent_filter):
            for index, endpoint in enumerate(agent.endpoints):
                if request.endpoint_name and endpoint.name != request.endpoint_name:
                    continue
                if request.protocol and endpoint.protocol != request.protocol:
                    continue
                position = f"{agent.agent_id}/{index:05d}"
                if position <= after:
                    continue
                found.append(
                    (
                        position,
                        discovery_pb2.AgentEndpoint(
                            agent_id=agent.agent_id,
                            agent_name=agent.name,
                            agent_type=agent.type,
                            status=agent.status,
                            endpoint=endpoint,
                        ),
                    )
                )
        page = found[:size]
        more = len(found) > size
        return [entry for _, entry in page], encode_page_token(page[-1][0]) if more else ""

    def resolve(
        self, request: discovery_pb2.ResolveAgentRequest
    ) -> tuple[agent_pb2.Agent, agent_pb2.Endpoint | None, int]:
        violations = Violations()
        agent_filter = self.query_filter(request.query, violations)
        if request.strategy not in Strategy.values():
            violations.add("strategy", "unknown strategy")
        if request.strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH and not request.hash_key:
            violations.add("hash_key", "is required with the CONSISTENT_HASH strategy")
        violations.text("hash_key", request.hash_key, 1024)
        violations.raise_if_any()
        candidates = list(self.candidates(request.query, agent_filter))
        if not candidates:
            raise FailedPrecondition("no ready agent matches the query")
        chosen = self.pick(request.strategy, candidates, request.hash_key, request.query.SerializeToString())
        endpoint = next((e for e in chosen.endpoints if e.name == request.endpoint_name), None)
        if endpoint is None and chosen.endpoints:
            endpoint = chosen.endpoints[0]
        return chosen, endpoint, len(candidates)

    def pick(
        self, strategy: int, candidates: Sequence[agent_pb2.Agent], key: str, round_robin_key: bytes
    ) -> agent_pb2.Agent:
        if strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_LEAST_LOADED:
            return min(candidates, key=load_score)
        if strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_RANDOM:
            return self._rng.choice(candidates)
        if strategy == discovery_pb2.LOAD_BALANCING_STRATEGY_CONSISTENT_HASH:
            return rendezvous_pick(key, candidates)
        turn = self._round_robin.get((round_robin_key,), 0)
        self._round_robin[(round_robin_key,)] = turn + 1
        return candidates[turn % len(candidates)]
