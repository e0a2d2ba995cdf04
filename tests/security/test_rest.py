"""The REST gateway inherits the gRPC checks: it forwards `authorization` / `x-api-key`, so every
route answers 401 / 403 exactly where the RPC behind it answers UNAUTHENTICATED / PERMISSION_DENIED,
and a rate limit is a 429 with Retry-After."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from orchestrator_server.auth import RULES, Access
from orchestrator_server.gateway import DEFAULT_SERVICES
from orchestrator_server.gateway.http_rules import Route, build_route_table
from tests.conftest import Running
from tests.security.conftest import ADMIN_KEY, API_KEYS, READER_KEY

ROUTES = build_route_table(DEFAULT_SERVICES).routes


def _concrete(route: Route) -> str:
    return re.sub(r"\{[^}]+\}", "agt_0123", route.template.openapi_path)


@pytest.fixture
async def rest(servers: Callable[..., Any]) -> AsyncIterator[tuple[Running, aiohttp.ClientSession]]:
    running: Running = await servers(api_keys=API_KEYS, gateway_enabled=True)
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{running.server.http_port}") as session:
        yield running, session


async def _statuses(
    session: aiohttp.ClientSession, headers: dict[str, str], routes: list[Route]
) -> dict[str, int]:
    statuses = {}
    for route in routes:
        body = {} if route.body else None
        async with session.request(
            route.http_method, _concrete(route), json=body, headers=headers
        ) as response:
            statuses[f"{route.http_method} {route.template.text}"] = response.status
    return statuses


async def test_every_route_refuses_missing_wrong_and_weak_credentials(
    rest: tuple[Running, aiohttp.ClientSession],
) -> None:
    _, session = rest
    guarded = [route for route in ROUTES if RULES[route.grpc_path].access is not Access.PUBLIC]
    assert len(guarded) >= 25
    missing = await _statuses(session, {}, guarded)
    assert set(missing.values()) == {401}, missing
    for headers in ({"authorization": "Bearer not-a-key-0123456789"}, {"x-api-key": "not-a-key-0123456789"}):
        wrong = await _statuses(session, headers, guarded)
        assert set(wrong.values()) == {401}, wrong
    beyond_reader = [route for route in guarded if RULES[route.grpc_path].access is not Access.READ]
    weak = await _statuses(session, {"x-api-key": READER_KEY}, beyond_reader)
    assert set(weak.values()) == {403}, weak
    admitted = await _statuses(session, {"authorization": f"Bearer {ADMIN_KEY}"}, guarded)
    assert not {401, 403} & set(admitted.values()), admitted


async def test_rate_limit_is_429_with_retry_after(servers: Callable[..., Any]) -> None:
    running: Running = await servers(
        api_keys=API_KEYS, gateway_enabled=True, rate_limit_api_rate=0.1, rate_limit_api_burst=1
    )
    headers = {"x-api-key": READER_KEY}
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{running.server.http_port}") as session:
        async with session.get("/health/system", headers=headers) as response:
            assert response.status == 200
        async with session.get("/health/system", headers=headers) as response:
            assert response.status == 429
            assert int(response.headers["Retry-After"]) >= 1
