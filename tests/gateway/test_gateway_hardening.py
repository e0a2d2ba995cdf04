"""Hostile HTTP: huge deadlines, held half-sent requests (slowloris), and secrets in over-long headers.

The first runs against the scripted backend; the others against a real orchestrator (in process, or
as a subprocess whose stderr is read), since they are about the process as a whole.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest

from orchestrator_server.gateway.app import MAX_DEADLINE_SECONDS
from tests.conftest import Running, ServerProcess, Stubs, async_wait_for
from tests.gateway.conftest import ScriptedBackend
from tests.security.conftest import ADMIN_KEY, API_KEYS

# -- deadlines (issue 10, item 8) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value"),
    [("x-request-timeout", "1e308"), ("grpc-timeout", "99999999H"), ("x-request-timeout", "1e12")],
)
async def test_a_huge_deadline_is_clamped_not_an_instant_504(
    backend: ScriptedBackend, http: aiohttp.ClientSession, header: str, value: str
) -> None:
    async with http.get("/agents/list", headers={header: value}) as response:
        assert response.status == 200, await response.text()
    remaining = backend.last("RegistryService/ListAgents").time_remaining
    assert remaining is not None and MAX_DEADLINE_SECONDS - 60 < remaining <= MAX_DEADLINE_SECONDS


# -- slowloris (item 10) --------------------------------------------------------------------------------

HALF_SENT = b"GET /livez HTTP/1.1\r\nHost: orchestrator\r\nX-Slow: "


async def _eof_within(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before closing the connection (fails after `within` seconds); a reset
    (closed with our request unread) counts as closed without an answer."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        return b""


CAP, HELD, HEADER_TIMEOUT = 64, 300, 1.5
LIMITS = {"gateway_max_connections": CAP, "gateway_header_timeout": HEADER_TIMEOUT}


async def _hold_half_sent_requests(port: int, register: Callable[[str], Awaitable[Any]]) -> int:
    """HELD half-sent requests against a cap of CAP: the gateway answers, closes them all, and gRPC
    (`register`) works throughout. Returns how many were refused with a 503."""
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(HELD):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HALF_SENT)
            connections.append((reader, writer))  # the writer too: collecting it closes the socket
        opened = time.monotonic()
        # gRPC is untouched by the HTTP abuse.
        await register("while-held")
        # A normal request is answered: refused quickly over the cap, or served.
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(f"http://127.0.0.1:{port}/livez") as response:
                assert response.status in (200, 503)
                if response.status == 503:
                    assert response.headers["Retry-After"] == "1"
                    assert (await response.json())["error"]["status"] == "UNAVAILABLE"
            assert time.monotonic() - started < 5.0
        # Every held connection ends: those over the cap at once with a 503, the others after the
        # header timeout without an answer.
        answers = await asyncio.gather(
            *(_eof_within(reader, HEADER_TIMEOUT + 30) for reader, _ in connections)
        )
        closed_after = time.monotonic() - opened
        refused = [answer for answer in answers if answer.startswith(b"HTTP/1.1 503")]
        assert all(answer == b"" for answer in answers if not answer.startswith(b"HTTP/1.1 503"))
        assert closed_after < HEADER_TIMEOUT + 30
        # Once they are gone, requests are served again, and gRPC still works.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/livez") as response,
        ):
            assert response.status == 200
        await register("after-held")
        return len(refused)
    finally:
        for _, writer in connections:
            writer.close()


async def test_half_sent_requests_are_capped_and_closed_while_grpc_keeps_working(
    servers: Callable[..., Any],
) -> None:
    running: Running = await servers(gateway_enabled=True, **LIMITS)
    refused = await _hold_half_sent_requests(
        running.server.http_port, lambda name: running.stubs.register(name, "1")
    )
    assert refused >= HELD - CAP - 5, f"{refused} of {HELD} refused at a cap of {CAP}"


async def test_half_sent_requests_against_the_served_process(
    server_process: Callable[..., ServerProcess],
) -> None:
    """The same against `orchestrator serve` (uvloop, whose transports differ from asyncio's)."""
    process = server_process(
        GATEWAY_ENABLED="true", **{name.upper(): str(value) for name, value in LIMITS.items()}
    ).start()
    async with grpc.aio.insecure_channel(process.target) as channel:
        stubs = Stubs(channel)
        refused = await _hold_half_sent_requests(process.http_port, lambda name: stubs.register(name, "1"))
    assert refused >= HELD - CAP - 5, f"{refused} of {HELD} refused at a cap of {CAP}"


async def test_a_slow_body_is_cut_after_the_body_timeout(servers: Callable[..., Any]) -> None:
    running: Running = await servers(gateway_enabled=True, gateway_body_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", running.server.http_port)
    try:
        writer.write(
            b"POST /agents/register HTTP/1.1\r\nHost: o\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        answer = await _eof_within(reader, 30)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"DEADLINE_EXCEEDED" in answer
    finally:
        writer.close()


# -- secrets in over-long headers (item 12) ------------------------------------------------------------


async def test_an_over_long_header_never_puts_a_key_in_the_log(
    server_process: Callable[..., ServerProcess],
) -> None:
    process = server_process(GATEWAY_ENABLED="true", API_KEYS=API_KEYS, LOG_LEVEL="DEBUG").start()
    statuses = []
    for name in ("x-api-key", "authorization", "x-other"):
        value = ADMIN_KEY if name != "authorization" else f"Bearer {ADMIN_KEY}"
        reader, writer = await asyncio.open_connection("127.0.0.1", process.http_port)
        writer.write(f"GET /agents/list HTTP/1.1\r\nHost: o\r\n{name}: {value}{' ' * 9000}x\r\n\r\n".encode())
        answer = await _eof_within(reader, 30)
        writer.close()
        statuses.append(int(answer.split(b" ", 2)[1]))
    assert all(status in (400, 431) for status in statuses), statuses
    # A normal request afterwards is served (and logged), so the log is flushed past the bad ones.
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{process.http_port}/agents/list", headers={"x-api-key": ADMIN_KEY}
        ) as response,
    ):
        assert response.status == 200
    await async_wait_for(lambda: "malformed HTTP request" in process.log(), what="the warning")
    log = process.log()
    assert ADMIN_KEY not in log
    assert ADMIN_KEY[:12] not in log
    assert "Traceback" not in log and " ERROR " not in log


def test_redaction_scrubs_credentials_from_any_record() -> None:
    import logging

    from orchestrator_server.gateway.hardening import RedactingFilter

    record = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "headers %s", (f"x-api-key: {ADMIN_KEY}",), None
    )
    try:
        raise ValueError(f"Authorization: Bearer {ADMIN_KEY}")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert RedactingFilter().filter(record)
    text = logging.Formatter().format(record)
    assert ADMIN_KEY not in text and "[redacted]" in text
