"""A raw agent as a separate OS process, for tests that kill, drop and restart real processes.

It speaks the session protocol with the generated stubs only (no SDK), and writes what happens to
a JSON-lines file the test reads: welcome, assigned, completed, cancelled, ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any

import grpc
from google.protobuf import struct_pb2

from orchestrator.v1 import registry_pb2, registry_pb2_grpc, tasks_pb2, tasks_pb2_grpc


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.events = open(args.events, "a", buffering=1)  # noqa: SIM115
        self.channel = grpc.aio.insecure_channel(
            args.target,
            options=[("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000)],
        )
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.tasks = tasks_pb2_grpc.TasksServiceStub(self.channel)
        self.outbox: asyncio.Queue[registry_pb2.HeartbeatRequest | None] = asyncio.Queue()
        self.running: dict[str, asyncio.Task[None]] = {}  # attempt id -> work
        self.stopping = asyncio.Event()
        # SIGUSR1 cuts the current stream without a goodbye, as a network failure would.
        self.drop_requested = asyncio.Event()
        self.agent_id = ""
        self.token = ""

    def log(self, event: str, **fields: Any) -> None:
        self.events.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    async def register(self) -> None:
        labels = dict(item.split("=", 1) for item in self.args.label)
        response = await self.registry.RegisterAgent(
            registry_pb2.RegisterAgentRequest(
                name=self.args.name,
                instance_id=self.args.name,
                type=self.args.type,
                capabilities=self.args.capability,
                labels=labels,
                max_concurrent_tasks=self.args.capacity,
            )
        )
        self.agent_id, self.token = response.agent.agent_id, response.agent_token

    async def requests(self) -> Any:
        yield registry_pb2.HeartbeatRequest(
            hello=registry_pb2.SessionHello(
                agent_id=self.agent_id, agent_token=self.token, running_attempt_ids=list(self.running)
            )
        )
        while True:
            message = await self.outbox.get()
            if message is None:
                return
            yield message

    async def beat(self) -> None:
        sequence = 0
        while True:
            await asyncio.sleep(self.args.interval)
            sequence += 1
            self.outbox.put_nowait(
                registry_pb2.HeartbeatRequest(beat=registry_pb2.SessionBeat(sequence=sequence))
            )

    async def session(self) -> str:
        """One session; returns why it ended."""
        self.outbox = asyncio.Queue()
        call = self.registry.Heartbeat(self.requests())
        beats = asyncio.create_task(self.beat())
        drop = asyncio.create_task(self.drop_requested.wait())
        try:
            async for response in call:
                kind = response.WhichOneof("message")
                if kind == "welcome":
                    self.log(
                        "welcome",
                        agent_id=self.agent_id,
                        epoch=response.welcome.epoch,
                        kept=list(response.welcome.kept_attempt_ids),
                    )
                    drop.add_done_callback(lambda _: call.cancel())
                elif kind == "assignment":
                    self.on_assignment(response.assignment)
                elif kind == "cancellation":
                    work = self.running.pop(response.cancellation.attempt_id, None)
                    if work is not None:
                        work.cancel()
                    self.log(
                        "cancelled",
                        task_id=response.cancellation.task_id,
                        attempt_id=response.cancellation.attempt_id,
                    )
                elif kind == "reconnect":
                    self.log("reconnect_requested")
            return "closed"
        except grpc.aio.AioRpcError as error:
            return error.code().name
        except asyncio.CancelledError:
            return "dropped"
        finally:
            beats.cancel()
            drop.cancel()
            self.drop_requested.clear()

    def on_assignment(self, assignment: registry_pb2.TaskAssignment) -> None:
        task = assignment.task
        self.log(
            "assigned",
            task_id=task.task_id,
            attempt_id=assignment.attempt_id,
            type=task.spec.type,
            priority=task.spec.priority,
        )
        self.outbox.put_nowait(
            registry_pb2.HeartbeatRequest(
                task_update=registry_pb2.SessionTaskUpdate(
                    task_id=task.task_id,
                    attempt_id=assignment.attempt_id,
                    kind=registry_pb2.TASK_UPDATE_KIND_STARTED,
                )
            )
        )
        self.running[assignment.attempt_id] = asyncio.create_task(
            self.work(task.task_id, assignment.attempt_id, task)
        )

    async def work(self, task_id: str, attempt_id: str, task: Any) -> None:
        seconds = (
            task.spec.payload.fields["sleep"].number_value
            if "sleep" in task.spec.payload.fields
            else self.args.work
        )
        await asyncio.sleep(seconds)
        result = struct_pb2.Struct()
        result.update({"agent": self.args.name})
        metadata = (("authorization", f"Bearer {self.token}"),)
        while True:
            try:
                if "fail" in task.spec.payload.fields:
                    await self.tasks.FailTask(
                        tasks_pb2.FailTaskRequest(
                            task_id=task_id,
                            attempt_id=attempt_id,
                            error={
                                "message": "asked to fail",
                                "non_retryable": task.spec.payload.fields["fail"].string_value == "fatal",
                            },
                        ),
                        metadata=metadata,
                    )
                    self.log("failed", task_id=task_id, attempt_id=attempt_id)
                else:
                    await self.tasks.CompleteTask(
                        tasks_pb2.CompleteTaskRequest(task_id=task_id, attempt_id=attempt_id, result=result),
                        metadata=metadata,
                    )
                    self.log("completed", task_id=task_id, attempt_id=attempt_id)
                break
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(0.1)
                    continue
                self.log("refused", task_id=task_id, attempt_id=attempt_id, code=error.code().name)
                break
        self.running.pop(attempt_id, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, self.drop_requested.set)
        await self.register()
        stop = asyncio.create_task(self.stopping.wait())
        while True:
            session = asyncio.create_task(self.session())
            await asyncio.wait({session, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                self.outbox.put_nowait(
                    registry_pb2.HeartbeatRequest(goodbye=registry_pb2.SessionGoodbye(reason="stop"))
                )
                self.outbox.put_nowait(None)
                self.log("ended", why=await session)
                return
            why = session.result()
            self.log("ended", why=why)
            if not self.args.reconnect:
                return
            await asyncio.sleep(self.args.reconnect_delay)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--type", default="worker")
    parser.add_argument("--capability", action="append", default=[])
    parser.add_argument("--label", action="append", default=[])
    parser.add_argument("--capacity", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--work", type=float, default=0.0, help="seconds each task takes")
    parser.add_argument("--reconnect", action="store_true", help="open a new session when one ends")
    parser.add_argument("--reconnect-delay", type=float, default=0.1)
    args = parser.parse_args()

    async def run() -> None:
        # The channel must be created inside the running loop.
        await Agent(args).run()

    asyncio.run(run())


if __name__ == "__main__":
    main()
