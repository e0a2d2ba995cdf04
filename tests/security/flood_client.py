"""A caller far over its rate limit: `concurrency` loops of ListAgents for `seconds`, as its own process.

Prints one JSON line: calls answered OK, refused with RESOURCE_EXHAUSTED (and whether they carried
RetryInfo), and any other codes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from orchestrator.v1 import registry_pb2, registry_pb2_grpc


async def flood(target: str, key: str, seconds: float, concurrency: int) -> dict[str, object]:
    codes: collections.Counter[str] = collections.Counter()
    retry_hints = 0
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        deadline = time.monotonic() + seconds

        async def loop() -> None:
            nonlocal retry_hints
            while time.monotonic() < deadline:
                try:
                    await stub.ListAgents(
                        registry_pb2.ListAgentsRequest(page_size=1), metadata=metadata, timeout=5
                    )
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    status = rpc_status.from_call(error)  # type: ignore[arg-type]
                    if status is not None and any(
                        detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in status.details
                    ):
                        retry_hints += 1

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"codes": dict(codes), "retry_hints": retry_hints, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(flood(args.target, args.key, args.seconds, args.concurrency))), flush=True)


if __name__ == "__main__":
    main()
