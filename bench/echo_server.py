"""Baseline (a): a bare grpc.aio echo service, the stack's own limit.

``/bench.v1.Echo/Unary`` answers every request with a fixed payload sized like the product's unary
responses; ``/bench.v1.Echo/Bidi`` echoes every message of a stream (beat-sized in, ack-sized out).
Payloads are raw bytes: no protobuf work at all, only grpc.aio and the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.util import run, write_ready_file

EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
SERVICE = "bench.v1.Echo"
UNARY = f"/{SERVICE}/Unary"
BIDI = f"/{SERVICE}/Bidi"

# Same limits a production server raises for reconnect storms (BRIEF §5).
SERVER_OPTIONS = [
    ("grpc.max_pending_requests", 3000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
]


async def _serve(unary_response_bytes: int) -> None:
    response = b"r" * unary_response_bytes

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return response

    async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        # read()/write() in one coroutine: the cheapest way grpc.aio serves a stream.
        while True:
            request = await context.read()
            if request is EOF:
                return
            await context.write(request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    write_ready_file({"grpc_port": port, "pid": os.getpid()})
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--unary-response-bytes", type=int, default=300)
    args = parser.parse_args()
    run(_serve(args.unary_response_bytes))


if __name__ == "__main__":
    main()
