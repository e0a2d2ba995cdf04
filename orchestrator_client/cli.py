"""`orchestrator`: the admin CLI over the SDK, plus `orchestrator serve` (needs the server extra).

    orchestrator agents list [--type T] [--status READY] [--selector 'zone=a']
    orchestrator agents get|drain|undrain|deregister AGENT_ID
    orchestrator tasks list [--status PENDING] [--type T] [--agent AGENT_ID]
    orchestrator tasks get|cancel|wait TASK_ID
    orchestrator tasks create TYPE [--payload '{"k": 1}'] [--priority N] [--key IDEMPOTENCY_KEY]
        [--capability CAP]... [--selector 'zone=a'] [--target-agent AGENT_ID] [--max-attempts N]
    orchestrator health [AGENT_ID]
    orchestrator watch agents|health [--type T]      (one JSON line per change, until Ctrl-C)
    orchestrator watch task TASK_ID

Target and credentials come from --target / ORCHESTRATOR_TARGET (localhost:50051; several replicas
comma-separated, tried in turn when one is unavailable, or dns:///NAME:PORT) and
--api-key / ORCHESTRATOR_API_KEY. Lists print a table; --json prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from orchestrator_client import v1
from orchestrator_client.admin import AdminClient
from orchestrator_client.errors import OrchestratorError


def to_json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))


def short_enum(name: str, prefix: str) -> str:
    return name.removeprefix(prefix)


def agent_row(agent: v1.Agent) -> list[str]:
    return [
        agent.agent_id,
        agent.name,
        agent.instance_id,
        agent.type,
        short_enum(v1.AgentStatus.Name(agent.status), "AGENT_STATUS_"),
        f"{agent.assigned_tasks}/{agent.max_concurrent_tasks}",
        ",".join(f"{key}={value}" for key, value in sorted(agent.labels.items())),
    ]


def task_row(task: v1.Task) -> list[str]:
    agent = task.attempts[-1].agent_id if task.attempts else ""
    return [
        task.task_id,
        task.spec.type,
        short_enum(v1.TaskStatus.Name(task.status), "TASK_STATUS_"),
        str(task.spec.priority),
        str(task.attempt_count or len(task.attempts)),
        agent,
    ]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())


async def collect(items: AsyncIterator[Any], limit: int) -> list[Any]:
    found = []
    async for item in items:
        found.append(item)
        if len(found) >= limit:
            break
    return found


def agent_status(name: str) -> v1.AgentStatus.ValueType:
    return v1.AgentStatus.Value(name if name.startswith("AGENT_STATUS_") else f"AGENT_STATUS_{name.upper()}")


def task_status(name: str) -> v1.TaskStatus.ValueType:
    return v1.TaskStatus.Value(name if name.startswith("TASK_STATUS_") else f"TASK_STATUS_{name.upper()}")


async def run(args: argparse.Namespace) -> int:
    async with AdminClient(args.target, api_key=args.api_key or None, timeout=args.timeout) as client:
        if args.command == "agents":
            return await agents(client, args)
        if args.command == "tasks":
            return await tasks(client, args)
        if args.command == "health":
            if args.agent_id:
                print(to_json(await client.get_agent_health(args.agent_id)))
            else:
                print(to_json(await client.get_system_health()))
            return 0
        return await watch(client, args)


async def agents(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        found = await collect(
            client.list_agents(
                type=args.type,
                status=agent_status(args.status) if args.status else v1.AgentStatus.AGENT_STATUS_UNSPECIFIED,
                label_selector=args.selector,
            ),
            args.limit,
        )
        if args.json:
            for agent in found:
                print(to_json(agent))
        else:
            print_table(
                ["AGENT", "NAME", "INSTANCE", "TYPE", "STATUS", "TASKS", "LABELS"],
                [agent_row(a) for a in found],
            )
        return 0
    actions = {
        "get": client.get_agent,
        "drain": client.drain_agent,
        "undrain": client.undrain_agent,
        "deregister": client.deregister_agent,
    }
    print(to_json(await actions[args.action](args.id)))
    return 0


async def tasks(client: AdminClient, args: argparse.Namespace) -> int:
    if args.action == "list":
        found = await collect(
            client.list_tasks(
                status=task_status(args.status) if args.status else v1.TaskStatus.TASK_STATUS_UNSPECIFIED,
                type=args.type,
                agent_id=args.agent,
            ),
            args.limit,
        )
        if args.json:
            for task in found:
                print(to_json(task))
        else:
            print_table(
                ["TASK", "TYPE", "STATUS", "PRIORITY", "ATTEMPTS", "AGENT"], [task_row(t) for t in found]
            )
        return 0
    if args.action == "create":
        task = await client.create_task(
            args.id,
            json.loads(args.payload),
            priority=args.priority,
            idempotency_key=args.key,
            required_capabilities=args.capability,
            label_selector=args.selector,
            target_agent_id=args.target_agent,
            max_attempts=args.max_attempts,
        )
        print(to_json(task))
        return 0
    if args.action == "cancel":
        print(to_json(await client.cancel_task(args.id, args.reason)))
        return 0
    if args.action == "wait":
        task = await client.wait_for_result(args.id, timeout=None)
        print(to_json(task))
        return 0 if task.status == v1.TaskStatus.TASK_STATUS_SUCCEEDED else 1
    task = await client.get_task(args.id)
    print(to_json(task))
    if task.status == v1.TaskStatus.TASK_STATUS_PENDING and task.pending_reason.message:
        print(f"pending: {task.pending_reason.message}", file=sys.stderr)
    return 0


async def watch(client: AdminClient, args: argparse.Namespace) -> int:
    stream: AsyncIterator[Message]
    if args.what == "agents":
        stream = client.watch_agents(type=args.type)
    elif args.what == "health":
        stream = client.watch_agent_health(type=args.type)
    else:
        stream = client.watch_task(args.id)
    async for message in stream:
        print(to_json(message), flush=True)
    return 0


def add_common_options(parser: argparse.ArgumentParser, *, with_defaults: bool) -> None:
    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument(
        "--target",
        default=default(os.environ.get("ORCHESTRATOR_TARGET", "localhost:50051")),
        help="host:port of the orchestrator; several replicas comma-separated, or dns:///NAME:PORT",
    )
    parser.add_argument("--api-key", default=default(os.environ.get("ORCHESTRATOR_API_KEY", "")))
    parser.add_argument("--timeout", type=float, default=default(10.0), help="per-call deadline in seconds")
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="one JSON object per line instead of a table",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="orchestrator", description="OptiInfra orchestrator: server and admin CLI"
    )
    add_common_options(root, with_defaults=True)
    # The same options after the command (`orchestrator agents list --json`); SUPPRESS keeps a value
    # given before the command when none is given after it.
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, with_defaults=False)
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server and the REST gateway (configured by environment)")

    agents_parser = commands.add_parser("agents", parents=[common], help="list and manage agents")
    agents_parser.add_argument("action", choices=["list", "get", "drain", "undrain", "deregister"])
    agents_parser.add_argument("id", nargs="?", default="")
    agents_parser.add_argument("--type", default="")
    agents_parser.add_argument("--status", default="", help="READY, DEGRADED, DRAINING, DOWN, DEREGISTERED")
    agents_parser.add_argument("--selector", default="", help="label selector, e.g. 'zone=a,tier!=free'")
    agents_parser.add_argument("--limit", type=int, default=1000)

    tasks_parser = commands.add_parser("tasks", parents=[common], help="list, create and follow tasks")
    tasks_parser.add_argument("action", choices=["list", "get", "create", "cancel", "wait"])
    tasks_parser.add_argument("id", nargs="?", default="", help="task id (the task type for create)")
    tasks_parser.add_argument("--status", default="", help="PENDING, ASSIGNED, RUNNING, SUCCEEDED, ...")
    tasks_parser.add_argument("--type", default="")
    tasks_parser.add_argument("--agent", default="")
    tasks_parser.add_argument("--payload", default="{}", help="JSON object")
    tasks_parser.add_argument("--priority", type=int, default=0)
    tasks_parser.add_argument("--key", default="", help="idempotency key")
    tasks_parser.add_argument(
        "--capability", action="append", default=[], help="required agent capability (repeatable)"
    )
    tasks_parser.add_argument("--selector", default="", help="label selector the agent must match")
    tasks_parser.add_argument("--target-agent", default="", help="only this agent may run the task")
    tasks_parser.add_argument("--max-attempts", type=int, default=0, help="0 = the server default")
    tasks_parser.add_argument("--reason", default="")
    tasks_parser.add_argument("--limit", type=int, default=1000)

    health_parser = commands.add_parser("health", parents=[common], help="system health, or one agent's")
    health_parser.add_argument("agent_id", nargs="?", default="")

    watch_parser = commands.add_parser("watch", parents=[common], help="follow changes as JSON lines")
    watch_parser.add_argument("what", choices=["agents", "health", "task"])
    watch_parser.add_argument("id", nargs="?", default="")
    watch_parser.add_argument("--type", default="")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        try:
            from orchestrator_server.cli import serve_from_env
        except ImportError as error:  # a client-only install
            print(
                f"orchestrator serve needs the server extra (pip install 'optiinfra-orchestrator[server]'): {error}"
            )
            return 2
        return serve_from_env()
    needs_id = (args.command in ("agents", "tasks") and args.action != "list") or (
        args.command == "watch" and args.what == "task"
    )
    if needs_id and not args.id:
        print(f"orchestrator {args.command}: an id is required", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(args))
    except OrchestratorError as error:
        print(f"orchestrator: {error.grpc_code.name}: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except (ValueError, json.JSONDecodeError) as error:
        print(f"orchestrator: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
