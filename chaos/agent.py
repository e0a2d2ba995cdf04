"""One SDK agent of the chaos run, as its own process: `python -m chaos.agent --target --name --log`.

It handles the task type `chaos` (sleeps for payload["sleep"] seconds, returns payload["n"]) and
appends one JSON line per event to `--log`: `run` when a handler starts, `accepted` when the server
answered OK to the attempt's CompleteTask. The driver counts re-runs and double completions from
these lines; nothing else in the agent knows it is being tested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import IO, Any

from orchestrator_client import Agent, TaskContext, v1

TASK_TYPE = "chaos"


# The hook below overrides the SDK's one CompleteTask call; were it renamed, completions would
# silently go unrecorded and double completions unseen, so its absence stops the run at once.
if not callable(getattr(Agent, "_complete_call", None)):
    raise SystemExit("chaos.agent: orchestrator_client.Agent has no _complete_call to record completions")


class RecordingAgent(Agent):
    """An SDK agent that also records each completion the server accepted."""

    def __init__(self, target: str, name: str, log: IO[str]) -> None:
        super().__init__(target, name=name, instance_id=name, type="chaos", max_concurrent_tasks=8)
        self.log = log

    def record(self, event: str, task_id: str, attempt_id: str) -> None:
        self.log.write(json.dumps({"event": event, "task_id": task_id, "attempt_id": attempt_id}) + "\n")

    async def _complete_call(self, request: v1.CompleteTaskRequest, deadline: float) -> object:
        # The SDK's one CompleteTask call: it returns only when the server accepted the result.
        response = await super()._complete_call(request, deadline)
        self.record("accepted", request.task_id, request.attempt_id)
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with open(args.log, "a", buffering=1, encoding="utf-8") as log:
        agent = RecordingAgent(args.target, args.name, log)

        @agent.task(TASK_TYPE)
        async def work(ctx: TaskContext) -> dict[str, Any]:
            agent.record("run", ctx.task_id, ctx.attempt_id)
            await asyncio.sleep(float(ctx.payload.get("sleep", 0.0)))
            return {"n": ctx.payload.get("n")}

        async def serve() -> None:
            async with agent:
                await agent.run_forever()

        asyncio.run(serve())


if __name__ == "__main__":
    main()
