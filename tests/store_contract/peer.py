"""A second store in a process of its own, driven over stdin/stdout (JSON lines), on the same
database as the test's store:

    python -m tests.store_contract.peer <database>   (a file path or a postgresql:// URL)

Requests: {"op": "commit", "changes": [change, ...]} commits the changes concurrently, where a
change is {"events": [base64 Event], "expect": [[id, revision]], "claims": [[task, agent, epoch]]};
{"op": "acquire", "name", "holder", "ttl"}; {"op": "release", "name", "holder"}; {"op": "seen"}
(the revisions its listener got, in order); {"op": "quit"}. Each gets one JSON line back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from typing import Any

from orchestrator.v1 import event_pb2
from orchestrator_server.errors import AlreadyExists
from orchestrator_server.store import Change, ConditionFailed, Expect, PlacementClaim, Store, open_store
from tests.store_contract.builders import Recorder


def encode_change(change: Change) -> dict[str, Any]:
    return {
        "events": [base64.b64encode(event.SerializeToString()).decode() for event in change.events],
        "expect": [[expect.entity_id, expect.revision] for expect in change.expect],
        "claims": [[claim.task_id, claim.agent_id, claim.session_epoch] for claim in change.claims],
    }


def decode_change(data: dict[str, Any]) -> Change:
    return Change(
        events=[event_pb2.Event.FromString(base64.b64decode(event)) for event in data["events"]],
        expect=[Expect(entity_id, revision) for entity_id, revision in data["expect"]],
        claims=[PlacementClaim(task_id, agent_id, epoch) for task_id, agent_id, epoch in data["claims"]],
    )


async def commit(store: Store, recorder: Recorder, change: Change) -> dict[str, Any]:
    try:
        revision = await store.commit(change)
    except ConditionFailed as failed:
        return {"failed": failed.reason, "actual": failed.actual, "seen": recorder.last}
    except AlreadyExists as exists:
        return {"exists": exists.message}
    return {"revision": revision, "seen": recorder.last}


async def handle(store: Store, recorder: Recorder, request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "commit":
        changes = [decode_change(change) for change in request["changes"]]
        return await asyncio.gather(*(commit(store, recorder, change) for change in changes))
    if op == "acquire":
        lease = await store.acquire_lease(request["name"], request["holder"], request["ttl"])
        return None if lease is None else {"holder": lease.holder, "term": lease.term}
    if op == "release":
        await store.release_lease(request["name"], request["holder"])
        return None
    if op == "seen":
        return recorder.revisions
    raise ValueError(f"unknown op {op!r}")


async def main(path: str) -> None:
    recorder = Recorder()
    store = open_store(path, synchronous="NORMAL")
    await store.open(recorder)
    print(json.dumps("ready"), flush=True)
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line or json.loads(line)["op"] == "quit":
            break
        print(json.dumps(await handle(store, recorder, json.loads(line))), flush=True)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
